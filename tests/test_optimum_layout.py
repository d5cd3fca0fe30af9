"""gaq export --optimum-from (issue 15): a copy of an Optimum ONNX pipeline folder with gaq's UNet in unet/,
checked against the contract Optimum's ORTDiffusionPipeline relies on (Optimum itself is not installed here:
benchmarks/optimum_check.sh runs the real pipeline in its own environment)."""
import hashlib
import json
import os
import shutil

import numpy as np
import onnx
import pytest

from gaq_backend.cli import main


def _tree_digest(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def pipeline_and_quantized(tmp_path_factory):
    import yaml
    from conftest import make_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("optimum")
    pipe_dir = make_tiny_sd_pipeline(str(root / "tiny-sd"))
    (root / "prompts.txt").write_text("a red cat\nthe blue sea\n")
    recipe = dict(model=pipe_dir, algorithm="minmax", sampler=dict(kind="pipeline", num_inference_steps=4),
                  calibration=dict(n_per_step=4, interval=2, n_groups=2, val_fraction=0.25, batch_size=4, prompts=str(root / "prompts.txt"),
                                   guidance_scale=5.0, cache_dir=str(root / "cache")),
                  quantization=dict(w_bits=8, a_bits=8, keep_fp=["conv_in", "conv_out"]), report=dict(num_samples=1, grid=1, batch_size=1, sensitivity=False))
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["quantize", str(root / "r.yaml"), "--out", str(root / "q"), "--quiet"]) == 0
    # an Optimum-shaped folder, as optimum-cli export onnx --task text-to-image writes it
    from diffusers import UNet2DConditionModel

    from exporters.onnx_export import export_fp

    opt = root / "optimum"
    for part in ("scheduler", "tokenizer"):
        shutil.copytree(os.path.join(pipe_dir, part), opt / part)
    shutil.copy(os.path.join(pipe_dir, "model_index.json"), opt / "model_index.json")
    for part in ("text_encoder", "vae_decoder", "vae_encoder"):
        (opt / part).mkdir()
        (opt / part / "model.onnx").write_bytes(b"an ONNX file gaq copies and never reads")
        (opt / part / "config.json").write_text("{}")
    (opt / "unet").mkdir()
    export_fp(UNet2DConditionModel.from_pretrained(os.path.join(pipe_dir, "unet")), str(opt / "unet" / "model.onnx"))
    shutil.copy(os.path.join(pipe_dir, "unet", "config.json"), opt / "unet" / "config.json")
    return root, str(opt), str(root / "q")


def test_optimum_folder_gets_the_quantized_unet_and_nothing_else_changes(pipeline_and_quantized):
    root, opt, q = pipeline_and_quantized
    before = _tree_digest(opt)
    out = root / "deploy"
    assert main(["export", q, "--optimum-from", opt, "--out", str(out), "--quiet"]) == 0
    assert _tree_digest(opt) == before  # the source is only read
    after = _tree_digest(str(out))
    for name, digest in before.items():
        if not name.startswith("unet" + os.sep):
            assert after[name] == digest, name
    model = onnx.load(str(out / "unet" / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    dims = lambda tt: [d.dim_param or d.dim_value for d in tt.shape.dim]  # noqa: E731
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states"] and [o.name for o in model.graph.output] == ["out_sample"]
    assert dims(inputs["timestep"]) == [] and inputs["timestep"].elem_type == onnx.TensorProto.FLOAT
    assert isinstance(dims(inputs["sample"])[0], str) and isinstance(dims(inputs["encoder_hidden_states"])[0], str)  # dynamic batch
    cfg = json.loads((out / "unet" / "config.json").read_text())
    assert cfg["cross_attention_dim"] == json.loads(open(os.path.join(opt, "unet", "config.json")).read())["cross_attention_dim"]
    # fed as Optimum feeds it: by name, cast to the declared dtype, batch 2 for classifier-free guidance
    from exporters.ort_runtime import ORT_DTYPES, create_session

    sess = create_session(str(out / "unet" / "model.onnx"))
    declared = {i.name: (ORT_DTYPES[i.type], i.shape) for i in sess.get_inputs()}
    s = declared["sample"][1]
    feed = {"sample": np.zeros((2, s[1], cfg["sample_size"], cfg["sample_size"])),
            "timestep": np.asarray(999, dtype=np.int64), "encoder_hidden_states": np.zeros((2, 7, cfg["cross_attention_dim"]))}
    y = sess.run(None, {k: v.astype(declared[k][0]) for k, v in feed.items()})[0]
    assert y.shape == feed["sample"].shape and np.isfinite(y).all()


def test_optimum_export_refuses_what_it_must_not_touch(pipeline_and_quantized, tmp_path, capsys):
    root, opt, q = pipeline_and_quantized
    out = tmp_path / "deploy"
    assert main(["export", q, "--optimum-from", opt, "--out", str(out), "--quiet"]) == 0
    assert main(["export", q, "--optimum-from", opt, "--out", str(out), "--quiet"]) == 0  # gaq's own folder: replaced
    (out / "notes.txt").write_text("mine")
    cases = [(["--out", str(out)], "that gaq did not write"),
             (["--out", os.path.join(opt, "copy")], "overlaps --optimum-from"),
             (["--out", str(tmp_path / "x"), "--optimum-from", str(tmp_path)], "no model_index.json")]
    for extra, message in cases:
        argv = ["export", q, "--optimum-from", opt, "--quiet"] + extra
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert (out / "notes.txt").read_text() == "mine" and not (tmp_path / "x").exists()
    bad = tmp_path / "other"
    shutil.copytree(opt, bad)
    cfg = json.loads((bad / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] = 99
    (bad / "unet" / "config.json").write_text(json.dumps(cfg))
    assert main(["export", q, "--optimum-from", str(bad), "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "is not this pipeline's: cross_attention_dim" in capsys.readouterr().err
