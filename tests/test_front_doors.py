"""Real diffusers UNets through the three front doors (issue 13): tiny random configs of the real classes
(SD-like and SDXL-like UNet2DConditionModel, class-conditional and LDM-style latent UNet2DModel),
calibrated from the user's own sampling loop with diffusers' schedulers."""
import copy

import pytest
import torch
from torch import nn

import gaq_backend as gaq
from gaq_backend.algorithms.gradient_aligned import GradientAlignedConfig
from gaq_backend.algorithms.temporal import TemporalConfig
from gaq_backend.algorithms.uniform import UniformConfig
from gaq_backend.api import check_quantizable
from gaq_backend.calibration.recorder import Recorder, RecordingError
from gaq_backend.config import CalibrationConfig, ConfigError

COND_DIM, SEQ = 12, 5


def sd_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=COND_DIM, attention_head_dim=4, norm_num_groups=4).eval()


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=COND_DIM, attention_head_dim=4, norm_num_groups=4, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=COND_DIM + 6 * 4).eval()


def class_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=4, norm_num_groups=4, num_class_embeds=10).eval()


def ldm_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=4, norm_num_groups=4).eval()


def sampling_loop(kind: str, n_images: int = 3, steps: int = 5, seed: int = 0):
    """A user's own loop over a diffusers scheduler: Euler (float timesteps) with classifier-free guidance
    for the text-conditioned UNets, DPM-Solver for the class-conditional one, DDIM for the LDM."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    def loop(unet):
        g = torch.Generator().manual_seed(seed)
        c, s = unet.config.in_channels, unet.config.sample_size
        sched = {"sd": EulerDiscreteScheduler, "sdxl": EulerDiscreteScheduler, "class": DPMSolverMultistepScheduler,
                 "ldm": DDIMScheduler}[kind](num_train_timesteps=1000)
        sched.set_timesteps(steps)
        x = torch.randn(n_images, c, s, s, generator=g) * sched.init_noise_sigma
        text = torch.randn(n_images, SEQ, COND_DIM, generator=g)
        extra = {}
        if kind == "sdxl":
            extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2 * n_images, COND_DIM, generator=g),
                                           "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]]).repeat(2 * n_images, 1)}}
        labels = torch.randint(0, 10, (n_images,), generator=g)
        with torch.no_grad():
            for t in sched.timesteps:
                if kind in ("sd", "sdxl"):  # CFG: one call on the doubled batch, t as a 0-d tensor as pipelines pass it
                    inp = sched.scale_model_input(torch.cat([x, x]), t)
                    uncond, cond = unet(inp, t, encoder_hidden_states=torch.cat([torch.zeros_like(text), text]), **extra).sample.chunk(2)
                    eps = uncond + 5.0 * (cond - uncond)
                elif kind == "class":
                    eps = unet(x, t, class_labels=labels).sample
                else:
                    eps = unet(x, t).sample
                x = sched.step(eps, t, x).prev_sample
        return x
    return loop


MAKERS = {"sd": sd_unet, "sdxl": sdxl_unet, "class": class_unet, "ldm": ldm_unet}
CAL = CalibrationConfig(val_fraction=0.25, n_groups=2, max_per_step=8, seed=0)


def _config(algorithm, bits="W8A8"):
    return gaq.preset(bits, algorithm=algorithm, calibration=CAL, keep_fp=["conv_in", "conv_out"])


def _fp_eps(unet, calib):
    from gaq_backend.sampling import unet_forward

    with torch.no_grad():
        return unet_forward(unet, calib.x, calib.t, calib.cond)


ALGORITHMS = [gaq.MinMaxConfig(), UniformConfig(iters=4, act_iters=4, batch_size=8),
              TemporalConfig(iters=4, act_iters=4, tib_iters=4, batch_size=8),
              GradientAlignedConfig(iters=4, act_iters=4, outer_iters=2, outer_batch_size=8, batch_size=8, diagnostics=False)]


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_every_algorithm_quantizes_every_kind_of_unet_from_the_users_loop(kind, tmp_path):
    held_out = None
    for algo in ALGORITHMS:
        unet = MAKERS[kind]()
        fp = copy.deepcopy(unet)
        q = gaq.quantize(unet, _config(algo), forward_loop=sampling_loop(kind), progress=False)
        held = q.gaq_info.held_out
        assert len(held) > 0 and held.x.shape[1:] == (fp.config.in_channels, 8, 8)
        held_out = held
        with torch.no_grad():
            err = (_fp_eps(q, held) - held.eps).pow(2).mean() / held.eps.pow(2).mean()
        # W8A8 stays close to FP: these random tiny UNets lose 0.1-17% (relative MSE) to per-tensor INT8
        # activations, most of it at the split skip-connection quantizers; a broken replay of the recorded
        # inputs (wrong conditioning, timestep or CFG half) gives errors of order 1
        assert err < 0.3, (algo.name, float(err))
    # save -> load is exact, for the class the model came in
    out = tmp_path / "q"
    gaq.save_quantized(q, str(out))
    loaded, _, recipe = gaq.load_quantized(str(out))
    assert type(loaded) is type(q) and recipe.algorithm == "gradient_aligned"
    assert torch.equal(_fp_eps(loaded, held_out), _fp_eps(q, held_out))
    assert torch.equal(loaded.gaq_info.held_out.x, held_out.x)


def _recorded_calls(kind):
    """The forward-keyword dicts the user's loop passes to the UNet (what an NNCF user would hold)."""
    calls = []
    unet = MAKERS[kind]()
    unet.register_forward_pre_hook(lambda m, a, kw: calls.append(copy.deepcopy({"sample": a[0], "timestep": a[1], **kw})), with_kwargs=True)
    sampling_loop(kind)(unet)
    return calls


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_the_three_front_doors_give_the_same_model(kind):
    import nncf
    from torchao.quantization import quantize_

    cfg = _config(UniformConfig(iters=4, act_iters=4, batch_size=8), "W4A8")
    a = gaq.quantize(MAKERS[kind](), cfg, forward_loop=sampling_loop(kind), progress=False)

    b = MAKERS[kind]()
    quantize_(b, gaq.GAQConfig(cfg, step="prepare", progress=False), filter_fn=lambda m, fqn: fqn == "")
    sampling_loop(kind)(b)
    quantize_(b, gaq.GAQConfig(cfg, step="convert", progress=False), filter_fn=gaq.unet_root)

    calls = _recorded_calls(kind)
    c = gaq.quantize(MAKERS[kind](), cfg, calibration=nncf.Dataset(calls, lambda item: item), progress=False)
    d = gaq.quantize(MAKERS[kind](), cfg, calibration=calls, progress=False)

    sa = a.state_dict()
    for other in (b, c, d):
        so = other.state_dict()
        assert so.keys() == sa.keys() and all(torch.equal(sa[k], so[k]) for k in sa)


def test_recorder_keeps_a_bounded_timestep_balanced_seeded_subset():
    def run(seed):
        unet = sd_unet()
        with Recorder(unet, max_per_step=4, seed=seed) as rec:
            sampling_loop("sd", n_images=5, steps=5)(unet)
            sampling_loop("sd", n_images=5, steps=5, seed=1)(unet)  # a second run at the same timesteps
        return rec.tensors(), rec
    raw, rec = run(0)
    assert rec.calls == 10 and all(n == 20 for n in rec.seen.values())  # 2 runs x 5 images x CFG 2 per timestep
    assert raw["t"].dtype == torch.float32 and not torch.equal(raw["t"], raw["t"].round())  # Euler's float timesteps
    assert torch.bincount(raw["step"]).tolist() == [4] * 5  # balanced, bounded
    assert raw["encoder_hidden_states"].shape == (20, SEQ, COND_DIM) and raw["x"].shape == (20, 4, 8, 8)
    again, _ = run(0)
    other, _ = run(1)
    assert all(torch.equal(raw[k], again[k]) for k in raw)  # deterministic given the seed
    assert not torch.equal(raw["x"], other["x"])
    with pytest.raises(RecordingError, match="no UNet call was recorded"):
        Recorder(sd_unet()).tensors()


def test_recorder_rejects_what_it_cannot_replay():
    unet = sd_unet()
    x = torch.randn(2, 4, 8, 8)
    with Recorder(unet) as rec, pytest.raises(RecordingError, match="cross_attention_kwargs"):
        unet(x, 10, encoder_hidden_states=torch.randn(2, SEQ, COND_DIM), cross_attention_kwargs={"scale": 0.5})
    with Recorder(unet) as rec, pytest.raises(RecordingError, match="3 rows for a batch of 2"):
        unet(x, 10, encoder_hidden_states=torch.randn(2, SEQ, COND_DIM), class_labels=torch.zeros(3))
    assert not rec.rows


def test_guards_refuse_what_would_silently_break(monkeypatch):
    cfg = _config(gaq.MinMaxConfig())
    loop = sampling_loop("sd")
    with pytest.raises(ConfigError, match="torch.compile"):
        gaq.quantize(torch.compile(sd_unet()), cfg, forward_loop=loop)
    fused = sd_unet()
    fused.fuse_qkv_projections()
    with pytest.raises(ConfigError, match="fused QKV"):
        gaq.quantize(fused, cfg, forward_loop=loop)
    fused.unfuse_qkv_projections()  # what the message says to do: then it quantizes
    stale = lambda m: [n for n, c in m.named_modules() if hasattr(c, "to_qkv")]  # noqa: E731  (diffusers leaves them)
    check_quantizable(fused)  # a check: it changes nothing
    assert stale(fused)
    gaq.quantize(fused, cfg, forward_loop=loop, progress=False)
    assert not stale(fused)  # dropped before wrapping: neither wrapped nor saved
    done = gaq.quantize(sd_unet(), cfg, forward_loop=loop, progress=False)
    with pytest.raises(ConfigError, match="already quantized"):
        gaq.quantize(done, cfg, forward_loop=loop)
    lora = sd_unet()
    lora.down_blocks[0].attentions[0].proj_in.lora_A = nn.ModuleDict({"default": nn.Linear(8, 2)})  # what peft adds
    with pytest.raises(ConfigError, match="LoRA"):
        gaq.quantize(lora, cfg, forward_loop=loop)
    with pytest.raises(ConfigError, match="exactly one"):
        gaq.quantize(sd_unet(), cfg, progress=False)
    with pytest.raises(ConfigError, match="must be a dict"):
        gaq.quantize(sd_unet(), cfg, calibration=[torch.zeros(1)])


def _python_block(path: str, heading: str) -> str:
    import os
    import re

    text = open(os.path.join(os.path.dirname(__file__), "..", path)).read()
    return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


def test_readme_quantize_your_own_pipeline_runs(tmp_path, monkeypatch):
    """The README's copy-paste example, run as written (in a scratch working directory)."""
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_block("README.md", "## Quantize your own pipeline"), "README.md", "exec"), {"__name__": "readme"})
    loaded, _, recipe = gaq.load_quantized(str(tmp_path / "out" / "my-unet"))
    assert type(loaded).__name__ == "UNet2DModel" and recipe.algorithm == "temporal"


def test_python_api_page_examples_run(tmp_path, monkeypatch):
    """docs/python-api.md's three front doors and its sensitivity example, run as written."""
    monkeypatch.chdir(tmp_path)
    scope = {"__name__": "python_api"}
    exec(compile(_python_block("docs/python-api.md", "## Quantize your own pipeline"), "python-api.md", "exec"), scope)
    loaded, _, recipe = gaq.load_quantized(str(tmp_path / "out" / "my-unet"))
    assert type(loaded).__name__ == "UNet2DConditionModel" and recipe.algorithm == "uniform"
    exec(compile(_python_block("docs/python-api.md", "## Per-layer sensitivity"), "python-api.md", "exec"), scope)  # same names
    assert scope["rep"].layers and scope["rep"].rows > 0
    from gaq_backend.algorithms import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))   # the example's registration ends here
    exec(compile(_python_block("docs/python-api.md", "## Registering an algorithm"), "python-api.md", "exec"), {"__name__": "registering"})
    qunet = gaq.quantize(scope["load_unet"](), gaq.preset("W8A8", algorithm=registry._REGISTRY["my_calibrator"].config_cls(iters=7)),
                         forward_loop=scope["my_loop"], progress=False)
    assert qunet.gaq_info.stats.extra == {"iters": 7}


@pytest.mark.parametrize("kind,inputs", [
    ("sd", {"sample": 4, "timestep": 0, "encoder_hidden_states": 3}),
    ("sdxl", {"sample": 4, "timestep": 0, "encoder_hidden_states": 3, "text_embeds": 2, "time_ids": 2}),
    ("class", {"sample": 4, "timestep": 0, "class_labels": 1}),
    ("ldm", {"sample": 4, "timestep": 0}),
])
def test_export_follows_the_unets_real_signature(kind, inputs, tmp_path):
    """From the saved folder alone: Optimum's UNet contract (names, float32 rank-0 timestep, int64 class
    labels, dynamic batch, out_sample, config.json beside), parity on the held-out recorded inputs."""
    import json

    import numpy as np
    from exporters.onnx_export import export_quantized
    from exporters.ort_runtime import create_session, predict_noise

    q = gaq.quantize(MAKERS[kind](), _config(gaq.MinMaxConfig(), "W4A8"), forward_loop=sampling_loop(kind), progress=False)
    folder = tmp_path / "q"
    gaq.save_quantized(q, str(folder))
    out = tmp_path / "unet" / "model.onnx"
    export_quantized(str(folder), str(out), "int4", check_samples=16, progress=False)
    sess = create_session(str(out))
    got = {i.name: (i.type, len(i.shape)) for i in sess.get_inputs()}
    assert {k: r for k, (_, r) in got.items()} == inputs
    assert got["timestep"][0] == "tensor(float)" and got["sample"][0] == "tensor(float)"
    if "class_labels" in got:
        assert got["class_labels"][0] == "tensor(int64)"
    assert [o.name for o in sess.get_outputs()] == ["out_sample"]
    cfg = json.loads((out.parent / "config.json").read_text())
    assert cfg["_class_name"] == type(q).__name__ and cfg["in_channels"] == q.config.in_channels
    # dynamic batch (CFG doubles it) and resolution, at the recorded (possibly non-integer) timesteps: within
    # the export's parity bound of torch (which scales with the model's own float64-vs-float32 difference)
    from exporters.validate import compare_with_torch

    held = q.gaq_info.held_out
    for b, size in ((1, 8), (3, 8), (2, 16)):
        x = held.x[:b] if size == 8 else torch.nn.functional.interpolate(held.x[:b], size=(size, size))
        res = compare_with_torch(str(out), q, x, held.t[:b], {k: v[:b] for k, v in held.cond.items()})
        assert res["mean_steps"] <= res["bounds"]["mean_steps"] and res["max_steps"] <= res["bounds"]["max_steps"], (b, size, res)


def test_cli_quantizes_a_stable_diffusion_pipeline_folder_and_exports_from_the_folder_alone(tmp_path):
    """gaq quantize on a tiny StableDiffusionPipeline folder: its own Euler scheduler, prompts from a file,
    CFG; the report compares FP and quantized images of the same prompts and seeds; export needs only the
    output folder."""
    import json

    import yaml
    from conftest import make_tiny_sd_pipeline
    from gaq_backend.cli import main

    pipe_dir = make_tiny_sd_pipeline(str(tmp_path / "tiny-sd"))
    (tmp_path / "prompts.txt").write_text("a red cat\nthe blue sea\n")
    recipe = dict(model=pipe_dir, algorithm="minmax", sampler=dict(kind="pipeline", num_inference_steps=6),
                  calibration=dict(n_per_step=4, interval=2, n_groups=3, val_fraction=0.25, batch_size=4, prompts=str(tmp_path / "prompts.txt"),
                                   guidance_scale=5.0, cache_dir=str(tmp_path / "cache")),
                  quantization=dict(w_bits=8, a_bits=8, keep_fp=["conv_in", "conv_out"]), settings=dict(batch_size=16),
                  report=dict(num_samples=2, grid=2, batch_size=2))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["quantize", str(tmp_path / "r.yaml"), "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["calibration"]["n_steps"] == 3 and rep["calibration"]["n_train"] + rep["calibration"]["n_val"] == 3 * 8  # CFG rows
    assert 0 < rep["metrics"]["noise_mse"] and 0 <= rep["metrics"]["sample_mse_vs_fp"] < 0.5
    assert len(rep["sensitivity"]["layers"]) == len(rep["layers"]["wrapped"]) + len(rep["layers"]["attention"])  # text-conditioned calls
    loaded, sched, _ = gaq.load_quantized(str(out))
    assert type(loaded).__name__ == "UNet2DConditionModel" and sched["_class_name"] == "EulerDiscreteScheduler"
    assert loaded.gaq_info.held_out.t.dtype == torch.float32  # Euler's float timesteps, kept
    onnx_out = tmp_path / "unet" / "model.onnx"
    assert main(["export", str(out), "--out", str(onnx_out), "--check-samples", "6", "--quiet"]) == 0
    assert (onnx_out.parent / "config.json").exists()
    # gaq eval --prompts: both pipelines sample the same prompts and seeds (on one machine), scored on another
    assert main(["eval", str(out), "--prompts", str(tmp_path / "prompts.txt"), "--num-samples", "4", "--sample-only", "--quiet"]) == 0
    assert not (out / "eval.json").exists()
    assert main(["eval", str(out), "--num-samples", "4", "--from-images", "--quiet"]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["conditions"] == ["a red cat", "the blue sea"] * 2 and ev["pipeline"] == "StableDiffusionPipeline"
    m = ev["metrics"]
    assert 10 < m["psnr"]["mean"] < 80 and 0 < m["ssim"]["mean"] <= 1 and m["fid_vs_fp"] >= 0 and "not computed" in m["lpips"]
    assert (out / "eval-samples.png").exists()
    assert main(["eval", str(out), "--num-samples", "4", "--quiet"]) == 2   # a text pipeline needs its prompts
    assert main(["eval", str(out), "--prompts", str(tmp_path / "prompts.txt"), "--reference", "embedded-digits"]) == 2
    # an unknown scheduler name is an error, never a substitution; a missing prompts file too
    for bad, msg in (("sampler.kind=NopeScheduler", "no scheduler 'NopeScheduler'"), ("calibration.prompts=", "calibration.prompts must name")):
        assert main(["quantize", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o2"), "--quiet", "--set", bad]) == 2
        assert not (tmp_path / "o2").exists()


def test_cli_quantizes_an_sdxl_pipeline_folder_and_exports_it(tmp_path):
    """A tiny StableDiffusionXLPipeline folder (two text encoders, text_time UNet) through gaq quantize with its
    own prompts and CFG, then gaq export: SDXL's text_embeds / time_ids recorded and in the graph."""
    import json

    import onnx
    import yaml
    from gaq_backend.cli import main
    from tiny_pipeline import make_tiny_sdxl_pipeline

    pipe_dir = make_tiny_sdxl_pipeline(str(tmp_path / "tiny-sdxl"))
    (tmp_path / "prompts.txt").write_text("a red cat\nthe blue sea\n")
    recipe = dict(model=pipe_dir, algorithm="minmax", sampler=dict(kind="pipeline", num_inference_steps=6),
                  calibration=dict(n_per_step=4, interval=2, n_groups=3, val_fraction=0.25, batch_size=4, prompts=str(tmp_path / "prompts.txt"),
                                   guidance_scale=5.0, cache_dir=str(tmp_path / "cache")),
                  quantization=dict(w_bits=8, a_bits=8), settings=dict(batch_size=16), report=dict(num_samples=2, grid=2, batch_size=2, sensitivity=False))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["quantize", str(tmp_path / "r.yaml"), "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["calibration"]["n_train"] + rep["calibration"]["n_val"] == 3 * 8 and rep["metrics"]["noise_mse"] > 0
    loaded, _, _ = gaq.load_quantized(str(out))
    assert {"added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"} <= set(loaded.gaq_info.held_out.cond)
    assert any(k.startswith("add_embedding") for k in loaded.gaq_info.wrap.kept)   # kept by role, as ModelOpt keeps it
    onnx_out = tmp_path / "unet" / "model.onnx"
    assert main(["export", str(out), "--out", str(onnx_out), "--check-samples", "6", "--quiet"]) == 0
    names = {i.name for i in onnx.load(str(onnx_out), load_external_data=False).graph.input}
    assert {"sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"} == names


def test_cli_quantizes_a_class_conditional_unet_folder_with_the_recipes_labels(tmp_path):
    import json

    import yaml
    from diffusers import DDPMScheduler
    from gaq_backend.cli import main

    folder = tmp_path / "cls"
    class_unet().save_pretrained(str(folder))
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(str(folder))
    recipe = dict(model=str(folder), algorithm="uniform", sampler=dict(num_inference_steps=6),
                  calibration=dict(n_per_step=6, interval=2, n_groups=3, val_fraction=0.25, batch_size=6, class_labels=[3, 7],
                                   cache_dir=str(tmp_path / "cache")),
                  quantization=dict(w_bits=8, a_bits=8, keep_fp=["conv_in", "conv_out"]), settings=dict(iters=4, act_iters=4, batch_size=8),
                  report=dict(num_samples=2, grid=2, batch_size=2, sensitivity=False))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["quantize", str(tmp_path / "r.yaml"), "--out", str(out), "--quiet"]) == 0
    loaded, _, _ = gaq.load_quantized(str(out))
    assert set(loaded.gaq_info.held_out.cond["class_labels"].tolist()) == {3, 7}
    assert json.loads((out / "report.json").read_text())["metrics"]["sample_mse_vs_fp"] < 0.5
    assert main(["export", str(out), "--out", str(tmp_path / "m.onnx"), "--check-samples", "4", "--quiet"]) == 0
    # without labels, or with a label the UNet does not have: one line, nothing written
    for bad in ("calibration.class_labels=[]", "calibration.class_labels=[12]"):
        assert main(["quantize", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o2"), "--quiet", "--set", bad]) == 2
        assert not (tmp_path / "o2").exists()


def test_recipe_model_takes_a_subfolder_and_a_variant(tmp_path):
    from gaq_backend.models.loading import load_model
    from gaq_backend.recipe import dump_recipe, load_recipe

    root = tmp_path / "repo"
    ldm_unet().save_pretrained(str(root / "unet"), variant="v1")
    from diffusers import DDIMScheduler
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(str(root / "scheduler"))
    (tmp_path / "r.yaml").write_text(f"model: {{path: {root}, subfolder: unet, variant: v1}}\nalgorithm: minmax\n")
    r = load_recipe(str(tmp_path / "r.yaml"))
    loaded = load_model(r.model, r.model_options)
    assert type(loaded.unet).__name__ == "UNet2DModel" and loaded.scheduler_config["_class_name"] == "DDIMScheduler"
    dump_recipe(r, str(tmp_path / "again.yaml"))
    assert load_recipe(str(tmp_path / "again.yaml")).model_options == r.model_options  # round trip
    with pytest.raises(ConfigError, match="model.dtype must be one of"):
        (tmp_path / "bad.yaml").write_text(f"model: {{path: {root}, dtype: float8}}\nalgorithm: minmax\n")
        load_recipe(str(tmp_path / "bad.yaml"))
