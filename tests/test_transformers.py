"""Diffusion transformers (DiT, PixArt, SD3, Flux; tests/transformer_zoo.py) through every step a UNet takes."""
import pytest
import torch

import gaq_backend as gaq
from gaq_backend.algorithms.blocks import reconstruction_units
from gaq_backend.calibration.calibration_set import UNBATCHED
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
    """Dynamic batch: the traced graph (batch 2) runs at 1 and 3 rows and passes the export's own parity check there
    (Flux once fixed the traced batch inside its rotary embedding, through unflatten). The check's bound, not a fixed
    1e-3: onnxruntime and PyTorch may round a quantizer differently, and a random model carries such a flip far
    (measured 0.058 of the output's range on one CPU, under 1e-3 on another)."""
    from exporters.validate import validate

    res = run_case(generate(3), str(tmp_path), "minmax", 8, 8, "int8")
    q = res["model"]
    held = q.gaq_info.held_out
    for n in (1, 3):
        rows = held.subset(torch.arange(n))
        parity = validate(str(tmp_path / "m.onnx"), q, rows.x, torch.full((n,), float(rows.t[0])), rows.cond)
        assert parity["n_inputs"] == n and parity["layers"]["checked"] > 0


def _pipeline_recipe(tmp_path, model, **calibration):
    return dict(model=model, algorithm="uniform", sampler=dict(kind="pipeline", num_inference_steps=4),
                calibration=dict(dict(n_per_step=4, interval=2, n_groups=2, val_fraction=0.25, batch_size=4,
                                      cache_dir=str(tmp_path / "cache")), **calibration),
                quantization=dict(w_bits=4, a_bits=8), settings=dict(iters=4, act_iters=4, batch_size=8),
                report=dict(num_samples=2, grid=2, batch_size=2))


def _quantize_and_export(tmp_path, recipe, weights="int8"):
    import json

    import onnx
    import yaml
    from gaq_backend.cli import main

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["quantize", str(tmp_path / "r.yaml"), "--out", str(out), "--quiet"]) == 0
    rep = json.loads((out / "report.json").read_text())
    onnx_out = tmp_path / "transformer" / "model.onnx"
    assert main(["export", str(out), "--out", str(onnx_out), "--weights", weights, "--check-samples", "4", "--quiet"]) == 0
    assert (onnx_out.parent / "config.json").exists()
    return rep, [i.name for i in onnx.load(str(onnx_out), load_external_data=False).graph.input]


def test_cli_quantizes_a_dit_pipeline_folder_and_exports_it(tmp_path):
    """A tiny DiTPipeline folder (class labels, its own DDIM and guidance) through gaq quantize and gaq export:
    the pipeline's transformer is the denoiser; the exported graph is in the transformer contract."""
    import json

    from gaq_backend.cli import main
    from tiny_pipeline import make_tiny_dit_pipeline

    recipe = _pipeline_recipe(tmp_path, make_tiny_dit_pipeline(str(tmp_path / "dit")), class_labels=[1, 3])
    recipe["sampler"]["num_inference_steps"] = 6
    recipe["calibration"]["n_groups"] = 3
    rep, names = _quantize_and_export(tmp_path, recipe, weights="int4")
    assert rep["calibration"]["n_train"] + rep["calibration"]["n_val"] == 3 * 8 and 0 < rep["metrics"]["noise_mse"] < 1e-2
    loaded, _, _ = gaq.load_quantized(str(tmp_path / "out"))
    assert type(loaded).__name__ == "DiTTransformer2DModel" and "class_labels" in loaded.gaq_info.held_out.cond
    assert names == ["hidden_states", "timestep", "class_labels"]
    # gaq eval: FP and quantized pipelines from the same seeds, 8 images per class label, FID vs FP per class
    assert main(["eval", str(tmp_path / "out"), "--quiet"]) == 0
    ev = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert ev["n_samples"] == 16 and ev["conditions"] == [1, 3] * 8 and set(ev["metrics"]["fid_vs_fp_per_class"]) == {"1", "3"}
    assert main(["eval", str(tmp_path / "out"), "--prompts", str(tmp_path / "r.yaml"), "--quiet"]) == 2   # takes no prompts


# each text-to-image pipeline: its ONNX inputs, and whether it runs classifier-free guidance as a doubled batch
TEXT_PIPELINES = {
    "pixart": (["hidden_states", "timestep", "encoder_attention_mask", "encoder_hidden_states"], 2),
    "sd3": (["hidden_states", "timestep", "encoder_hidden_states", "pooled_projections"], 2),
    "flux": (["hidden_states", "timestep", "encoder_hidden_states", "guidance", "pooled_projections", "img_ids", "txt_ids"], 1),
}


@pytest.mark.parametrize("kind", sorted(TEXT_PIPELINES))
def test_cli_quantizes_a_text_to_image_transformer_pipeline_folder(tmp_path, kind, capsys):
    """Tiny PixArt-alpha, SD3 and Flux pipeline folders (random T5 / CLIP text encoders, their own DPM-Solver or
    flow-matching Euler) through --dry-run, gaq quantize and gaq export. Flux takes t / 1000 and embeds guidance
    (one row per image); the others double the batch for guidance. Every other timestep of each run is recorded."""
    import yaml

    import tiny_pipeline
    from gaq_backend.cli import main

    path = getattr(tiny_pipeline, f"make_tiny_{kind}_pipeline")(str(tmp_path / kind))
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\n")
    extra = dict(pipeline_kwargs=dict(use_resolution_binning=False)) if kind == "pixart" else {}
    recipe = _pipeline_recipe(tmp_path, path, prompts=str(tmp_path / "prompts.txt"), height=16, width=16, guidance_scale=3.0, **extra)
    inputs, per_image = TEXT_PIPELINES[kind]
    (tmp_path / "dry.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["quantize", str(tmp_path / "dry.yaml"), "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    assert f"for {4 * 2 * per_image} calibration rows" in capsys.readouterr().out and not (tmp_path / "dry").exists()
    rep, names = _quantize_and_export(tmp_path, recipe)
    assert rep["calibration"]["n_train"] + rep["calibration"]["n_val"] == 4 * 2 * per_image
    assert 0 < rep["metrics"]["noise_mse"] < 1e-2 and names == inputs
    if kind == "pixart":   # gaq eval --prompts with CLIP scores from a local (tiny, random) CLIP model
        import json

        from tiny_pipeline import make_tiny_clip

        clip = make_tiny_clip(str(tmp_path / "clip"))
        assert main(["eval", str(tmp_path / "out"), "--prompts", str(tmp_path / "prompts.txt"), "--clip", clip, "--quiet"]) == 0
        m = json.loads((tmp_path / "out" / "eval.json").read_text())["metrics"]
        assert m["clip_score"]["fp"]["n"] == m["clip_score"]["quantized"]["n"] == 4 and 0 <= m["clip_score"]["fp"]["mean"] <= 100
        assert main(["eval", str(tmp_path / "out"), "--prompts", str(tmp_path / "prompts.txt"), "--clip", str(tmp_path), "--quiet"]) == 2


def test_pipeline_kwargs_are_checked_against_the_pipeline(tmp_path):
    from gaq_backend.calibration.pipeline_capture import pipeline_kwargs
    from gaq_backend.config import ConfigError
    from diffusers import DiffusionPipeline
    from tiny_pipeline import make_tiny_dit_pipeline

    pipe = DiffusionPipeline.from_pretrained(make_tiny_dit_pipeline(str(tmp_path / "dit")))
    assert pipeline_kwargs(pipe, {}) == {}
    with pytest.raises(ConfigError, match="takes no argument 'use_resolution_binning'"):
        pipeline_kwargs(pipe, {"use_resolution_binning": False})
    with pytest.raises(ConfigError, match="gaq sets generator itself"):
        pipeline_kwargs(pipe, {"generator": 1})
    from gaq_backend.config import CalibrationConfig, from_dict

    with pytest.raises(ConfigError, match="calibration.pipeline_kwargs must be a mapping"):
        from_dict(CalibrationConfig, {"pipeline_kwargs": 3}, "calibration")
    with pytest.raises(ConfigError, match="calibration.pipeline_kwargs.x must be a number, string"):
        from_dict(CalibrationConfig, {"pipeline_kwargs": {"x": {"y": 1}}}, "calibration")


def test_block_wise_weights_calibrate_reload_and_export_as_matmul_nbits(tmp_path):
    """quantization.w_block_size: Linear weights with one scale per 16 input features (AdaRound on that grid),
    saved and reloaded exactly; --matmul-nbits writes them as DequantizeLinear(blocked) -> MatMul with a float
    input, which onnxruntime fuses to MatMulNBits, and the parity check holds against that model."""
    import onnx
    import onnxruntime as ort
    from exporters.onnx_export import export_quantized
    from gaq_backend.config import ConfigError
    from gaq_backend.wrapping.layers import QuantLinear

    r = run_case(generate(3), str(tmp_path), "uniform", 4, 8, w_block_size=16)   # Flux: double and single blocks
    layers = [m for m in r["model"].modules() if isinstance(m, QuantLinear)]
    blocked = [m for m in layers if m.weight_quantizers[0].block_size == 16]
    assert blocked and all(m.weight_quantizers[0].scale.shape == (m.out_features, m.in_features // 16) for m in blocked)
    assert r["reload_rel_error"] == r["rel_error"] < 0.05
    with pytest.raises(ValueError, match="--matmul-nbits needs --weights int4"):
        export_quantized(str(tmp_path / "q"), str(tmp_path / "x.onnx"), "int8", progress=False, matmul_nbits=True)
    out = str(tmp_path / "nbits.onnx")
    res = export_quantized(str(tmp_path / "q"), out, "int4", progress=False, matmul_nbits=True)
    blocked_dq = [n for n in onnx.load(out).graph.node if n.op_type == "DequantizeLinear"
                  and any(a.name == "block_size" and a.i == 16 for a in n.attribute)]
    assert len(blocked_dq) == len(blocked) and res.parity["max_steps"] <= 1
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(out, opts, providers=["CPUExecutionProvider"])
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node) == len(blocked)
    with pytest.raises(ConfigError, match="w_block_size must be 0 .* or a power of two >= 16"):
        gaq.QuantConfig(w_block_size=24)


def test_a_model_without_block_weights_is_refused_by_matmul_nbits(tmp_path):
    from exporters.onnx_export import export_quantized

    run_case(generate(1), str(tmp_path), "minmax", 4, 8)
    with pytest.raises(ValueError, match="no Linear layer with block-wise weights"):
        export_quantized(str(tmp_path / "q"), str(tmp_path / "x.onnx"), "int4", progress=False, matmul_nbits=True)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("seed", SEEDS)
def test_the_time_path_is_found_from_the_inputs(seed):
    """temporal's temporal information block on a transformer: the layers whose input is the same for every row
    of one timestep (the timestep / guidance embedders), nothing that reads the latent, the text or the class."""
    from gaq_backend.algorithms.temporal import time_path_layers
    from gaq_backend.api import record, wrap_for_config

    case = generate(seed)
    model = build(case)
    cfg = quant_config("temporal", 4, 8, keep_fp=[])
    calib = record(model, cfg, sampling_loop(case, 0))
    wrap_for_config(model, cfg)
    found = list(time_path_layers(model, calib))
    assert found and all("timestep_embedder" in n or "guidance_embedder" in n or n == "adaln_single.linear" for n in found), found


def test_temporal_reconstructs_a_quantized_time_path_of_a_transformer(tmp_path):
    """With the time path quantized (keep_fp without it), temporal reconstructs it as TFMQ-DM's TIB on one row
    per recorded timestep before the blocks, and fits its input ranges per timestep."""
    case = generate(1)   # PixArt: adaln_single's timestep embedder and its modulation read t alone
    r = run_case(case, str(tmp_path), "temporal", 4, 8, keep_fp=["=pos_embed.proj", "=proj_out", "=caption_projection.linear_1",
                                                                 "=caption_projection.linear_2"])
    tib = r["model"].gaq_info.stats.temporal_block
    assert tib.n_layers == 3 and tib.n_timesteps == case.steps and tib.loss_last < tib.loss_first
    assert r["reload_rel_error"] == r["rel_error"]
