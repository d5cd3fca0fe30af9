"""Diffusion transformers (DiT, PixArt, SD3, Flux; tests/transformer_zoo.py) through every step a UNet takes."""
import pytest
import torch

import gaq_backend as gaq
from gaq_backend.algorithms.blocks import reconstruction_units
from gaq_backend.calibration.recorder import UNBATCHED
from transformer_zoo import CLASSES, build, generate, quant_config, run_case, sampling_loop

SEEDS = [0, 1, 2, 3]   # one per class (generate cycles the classes over the seed)
ALGORITHMS = ["minmax", "uniform", "temporal", "gradient_aligned"]


def sampling_shape(case):
    side = case.config["sample_size"]
    return ((side // 2) ** 2, 16) if case.cls == "FluxTransformer2DModel" else (4, side, side)


def test_the_seeds_cover_every_class():
    assert {generate(s).cls for s in SEEDS} == set(CLASSES)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_recorder_takes_the_transformers_own_inputs(seed):
    case = generate(seed)
    from gaq_backend.api import record

    calib = record(build(case), quant_config("minmax", 8, 8), sampling_loop(case, 0))
    per_call = 2 if case.cls == "FluxTransformer2DModel" else 4   # Flux embeds guidance; the others double the batch for CFG
    assert len(calib) == per_call * case.steps and calib.x.shape[1:] == sampling_shape(case)
    if case.cls == "FluxTransformer2DModel":   # ids without a batch axis: kept once, seen as rows of one value
        ids = calib.cond[UNBATCHED + "img_ids"]
        assert ids.shape[0] == len(calib) and ids.stride(0) == 0
        assert calib.t.is_floating_point() and float(calib.t.max()) <= 1.0   # Flux's [0, 1] timestep, as recorded
        assert "guidance" in calib.cond and "pooled_projections" in calib.cond
    if case.cls == "PixArtTransformer2DModel":  # added_cond_kwargs of None values leave nothing behind
        assert not any(k.startswith("added_cond_kwargs") for k in calib.cond) and "encoder_attention_mask" in calib.cond


@pytest.mark.parametrize("seed", SEEDS)
def test_roles_keep_the_embedders_modulation_and_ends_and_blocks_are_units(seed):
    case = generate(seed)
    q = gaq.quantize(build(case), quant_config("minmax", 8, 8), forward_loop=sampling_loop(case, 0), progress=False)
    kept, wrapped = q.gaq_info.wrap.kept, q.gaq_info.wrap.wrapped
    assert any("timestep_embedder" in k for k in kept) and not any("timestep_embedder" in w for w in wrapped)
    assert {"pos_embed.proj", "x_embedder"} & set(kept) and {"proj_out", "proj_out_2"} & set(kept)
    assert any(k.endswith("norm1.linear") or k == "adaln_single.linear" for k in kept)   # the adaLN modulation
    units = reconstruction_units(q)
    blocks = [u.name for u in units if u.kind == "block"]
    n_blocks = case.config["num_layers"] + case.config.get("num_single_layers", 0)
    assert len(blocks) == n_blocks and all("transformer_blocks." in b for b in blocks), blocks
    assert q.gaq_info.wrap.attention   # every attention's two matmuls quantized, joint and rotary ones included


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_quantizes_saves_and_reloads(tmp_path, seed, algorithm):
    case = generate(seed)
    res = run_case(case, str(tmp_path), algorithm, 4, 8)
    assert 0 < res["rel_error"] < 0.05, (case.describe(), res["rel_error"])
    assert res["reload_rel_error"] == pytest.approx(res["rel_error"], rel=1e-4, abs=1e-9)


def test_w8a8_minmax_is_close_to_fp():
    for seed in SEEDS:
        case = generate(seed)
        from transformer_zoo import held_out_calls, relative_error

        q = gaq.quantize(build(case), quant_config("minmax", 8, 8), forward_loop=sampling_loop(case, 0), progress=False)
        assert relative_error(q, held_out_calls(case, build(case))) < 1e-3, case.describe()


def test_the_quantized_sdpa_changes_the_output_and_a_processor_without_sdpa_is_refused():
    from gaq_backend.wrapping.attention import QuantSDPAProcessor

    case = generate(2)   # SD3: JointAttnProcessor2_0
    q = gaq.quantize(build(case), quant_config("minmax", 8, 8), forward_loop=sampling_loop(case, 0), progress=False)
    proc = q.transformer_blocks[0].attn.processor
    assert isinstance(proc, QuantSDPAProcessor) and all(qz.enabled for qz in proc.quantizers.values())
    x = sampling_loop(case, 5)
    base = x(q)
    proc.quantizers["probs"].scale.data *= 8   # a coarse probs grid: the SDPA replacement is what runs
    assert not torch.allclose(base, x(q))

    class NoSDPA:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            return hidden_states, encoder_hidden_states
    wrapped = QuantSDPAProcessor.wrapping(NoSDPA(), 8, where="transformer_blocks.0.attn")
    with pytest.raises(NotImplementedError, match="does not compute through torch's scaled_dot_product_attention"):
        wrapped(q.transformer_blocks[0].attn, torch.zeros(1, 4, 16))


@pytest.mark.parametrize("seed,weights", [(0, "int8"), (1, "int4"), (2, "int8"), (2, "int4"), (3, "int8"), (3, "int4")])
def test_export_runs_in_onnxruntime_like_pytorch(tmp_path, seed, weights):
    """Optimum's transformer contract: the recorded inputs by name, a [batch] timestep, out_hidden_states; the gate
    (output bound and every layer on its own) passes on held-out inputs."""
    import onnx

    case = generate(seed)
    res = run_case(case, str(tmp_path), "minmax" if weights == "int8" else "uniform", 8 if weights == "int8" else 4, 8, weights)
    p = res["parity"]
    assert p["mean_steps"] < 0.25 and p["layers"]["checked"] > 0 and p["layers"]["max_rel_diff"] < 1e-5, p
    m = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    names = [i.name for i in m.graph.input]
    assert names[:2] == ["hidden_states", "timestep"] and [o.name for o in m.graph.output] == ["out_hidden_states"]
    assert len(m.graph.input[1].type.tensor_type.shape.dim) == 1     # timestep [batch], as Optimum exports it
    if case.cls == "SD3Transformer2DModel":
        assert set(names) == {"hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"}
    if case.cls == "FluxTransformer2DModel":   # Optimum's Flux inputs; the ids without a batch axis, as recorded
        assert {"img_ids", "txt_ids", "guidance", "pooled_projections"} <= set(names)
        ids = next(i for i in m.graph.input if i.name == "img_ids")
        assert [d.dim_value for d in ids.type.tensor_type.shape.dim][1:] == [3] and len(ids.type.tensor_type.shape.dim) == 2


def test_the_export_runs_at_other_batch_sizes(tmp_path):
    """Dynamic batch: the traced graph (batch 2) runs at 1 and 3 rows and agrees with PyTorch (Flux once fixed the
    traced batch inside its rotary embedding, through unflatten)."""
    import numpy as np

    from exporters.ort_runtime import predict_noise
    from exporters.runtimes import open_session
    from gaq_backend.sampling import unet_forward

    res = run_case(generate(3), str(tmp_path), "minmax", 8, 8, "int8")
    q, sess = res["model"], open_session(str(tmp_path / "m.onnx"), "onnxruntime", "cpu", precision="f32")
    held = q.gaq_info.held_out
    for n in (1, 3):
        rows = held.subset(torch.arange(n))
        t = torch.full((n,), float(rows.t[0]))
        got = predict_noise(sess, rows.x.numpy(), t.numpy(), 64, {k: v.numpy() for k, v in rows.cond.items()})
        want = unet_forward(q, rows.x, t, rows.cond).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-3 * np.abs(want).max()


def test_cli_quantizes_a_dit_pipeline_folder_and_exports_it(tmp_path):
    """A tiny DiTPipeline folder (class labels, its own DDIM and guidance) through gaq quantize and gaq export:
    the pipeline's transformer is the denoiser; the exported graph is in the transformer contract."""
    import json

    import onnx
    import yaml
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    from gaq_backend.cli import main

    torch.manual_seed(0)   # DiTPipeline's null class is 1000: the label table needs 1000 entries
    tr = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                               sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=8)
    DiTPipeline(transformer=tr, vae=vae, scheduler=DDIMScheduler()).save_pretrained(str(tmp_path / "dit"))
    recipe = dict(model=str(tmp_path / "dit"), algorithm="uniform", sampler=dict(kind="pipeline", num_inference_steps=6),
                  calibration=dict(n_per_step=4, interval=2, n_groups=3, val_fraction=0.25, batch_size=4, class_labels=[1, 3],
                                   cache_dir=str(tmp_path / "cache")),
                  quantization=dict(w_bits=4, a_bits=8), settings=dict(iters=4, act_iters=4, batch_size=8),
                  report=dict(num_samples=2, grid=2, batch_size=2))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["quantize", str(tmp_path / "r.yaml"), "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["calibration"]["n_train"] + rep["calibration"]["n_val"] == 3 * 8 and 0 < rep["metrics"]["noise_mse"] < 1e-2
    loaded, _, _ = gaq.load_quantized(str(out))
    assert type(loaded).__name__ == "DiTTransformer2DModel" and "class_labels" in loaded.gaq_info.held_out.cond
    onnx_out = tmp_path / "transformer" / "model.onnx"
    assert main(["export", str(out), "--out", str(onnx_out), "--weights", "int4", "--check-samples", "6", "--quiet"]) == 0
    names = [i.name for i in onnx.load(str(onnx_out), load_external_data=False).graph.input]
    assert names == ["hidden_states", "timestep", "class_labels"] and (onnx_out.parent / "config.json").exists()
