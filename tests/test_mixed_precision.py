"""Mixed-precision weights: ``quantization.w_bits_by_layer`` and ``mixed_precision_budget``
(gaq_backend/wrapping/mixed_precision.py), through gaq quantize, reload and the int4 export."""
import json

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper

from conftest import assert_one_error_line
from gaq_backend import load_quantized
from gaq_backend.cli import main
from gaq_backend.wrapping import quant_layers

from exporters.onnx_export import export_quantized

BUDGET = 0.25


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """The tiny model at W4A8 minmax, plain and with the budget, from one calibration cache."""
    from conftest import tiny_recipe

    root = tmp_path_factory.mktemp("mixed")
    out = {}
    for name, q in (("plain", {}), ("mixed", dict(mixed_precision_budget=BUDGET))):
        recipe = tiny_recipe(tiny_model_dir, str(root / "cache"), quantization=dict(w_bits=4, a_bits=8, **q))
        (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["quantize", str(root / f"{name}.yaml"), "--out", str(root / name), "--quiet"]) == 0
        out[name] = root / name
    return out


def test_the_choice_fits_the_budget_and_is_greedy_by_cost_per_weight(runs, tiny_model_dir):
    from gaq_backend.api import with_role_keep_fp
    from gaq_backend.calibration.capture import capture_calibration
    from gaq_backend.models.loading import load_model
    from gaq_backend.recipe import load_recipe
    from gaq_backend.wrapping.mixed_precision import choose_high_precision_layers

    report = json.loads((runs["mixed"] / "report.json").read_text())
    chosen = report["algorithm_stats"]["mixed_precision"]["chosen"]
    recipe = load_recipe(str(runs["mixed"].parent / "mixed.yaml"))
    loaded = load_model(recipe.model)
    calib, _ = capture_calibration(loaded.unet, loaded.scheduler_config, recipe.sampler, recipe.calibration, progress=False)
    config = with_role_keep_fp(loaded.unet, recipe.quant_config(), calib)
    choice = choose_high_precision_layers(loaded.unet, config, calib)
    assert choice.chosen == chosen                      # deterministic, and what quantize used
    model, _, _ = load_quantized(str(runs["mixed"]))
    size = {n: m.weight.numel() for n, m in quant_layers(model)}
    assert set(choice.costs) == set(size) and all(c >= 0 for c in choice.costs.values())
    allowed = BUDGET * 4 * sum(size.values())
    used = sum(4 * size[n] for n in chosen)
    assert 0 < used <= allowed and choice.extra_fraction == pytest.approx(used / (4 * sum(size.values())))
    per_weight = {n: choice.costs[n] / size[n] for n in size}
    assert chosen[0] == max(per_weight, key=per_weight.get)
    # greedy: every layer left out with a cost either no longer fits or is cheaper per weight than the last taken
    for n in set(size) - set(chosen):
        assert used + 4 * size[n] > allowed or choice.costs[n] == 0, n


def test_mixed_folder_reloads_with_8_bit_layers_and_lower_error(runs):
    plain = json.loads((runs["plain"] / "report.json").read_text())
    mixed = json.loads((runs["mixed"] / "report.json").read_text())
    chosen = mixed["algorithm_stats"]["mixed_precision"]["chosen"]
    model, _, recipe = load_quantized(str(runs["mixed"]))
    bits = {n: m.weight_quantizers[0].bits for n, m in quant_layers(model)}
    assert {n for n, b in bits.items() if b == 8} == set(chosen) and set(bits.values()) == {4, 8}
    assert recipe.quantization.w_bits_by_layer == {"=" + n: 8 for n in chosen}
    assert mixed["layers"]["w_bits"] == {n: 8 for n in chosen}
    assert plain["weight_bytes"]["extra_fraction"] == 0 and plain["layers"]["w_bits"] == {}
    assert mixed["weight_bytes"]["extra_fraction"] == pytest.approx(mixed["algorithm_stats"]["mixed_precision"]["extra_weight_bytes"])
    codes = {n: m.weight_int for n, m in quant_layers(model)}
    assert all(int(codes[n].abs().max()) <= 8 for n in bits if bits[n] == 4)
    assert max(int(codes[n].abs().max()) for n in chosen) > 8     # the chosen layers use the 8-bit range
    assert mixed["metrics"]["noise_mse"] < plain["metrics"]["noise_mse"]
    # re-running the saved recipe finds the budget spent and chooses nothing more
    again = runs["mixed"].parent / "again"
    assert main(["quantize", str(runs["mixed"] / "recipe.yaml"), "--out", str(again), "--quiet"]) == 0
    model2, _, _ = load_quantized(str(again))
    assert {n: m.weight_quantizers[0].bits for n, m in quant_layers(model2)} == bits


def test_int4_export_keeps_the_8_bit_layers_at_int8_with_parity(runs, tmp_path):
    model, _, _ = load_quantized(str(runs["mixed"]))
    out = str(tmp_path / "m.onnx")
    res = export_quantized(str(runs["mixed"]), out, "int4", progress=False)
    assert res.parity["max_steps"] <= res.parity["bounds"]["max_steps"]
    m = onnx.load(out)
    inits = {t.name: t for t in m.graph.initializer}
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["gaq.w_bits_by_layer"]) == load_quantized(str(runs["mixed"]))[2].quantization.w_bits_by_layer
    for name, layer in quant_layers(model):
        t = inits[f"unet.{name}.qdq_weight0"]
        want = onnx.TensorProto.INT8 if layer.weight_quantizers[0].bits == 8 else onnx.TensorProto.INT4
        assert t.data_type == want, name
        stored = numpy_helper.to_array(t).astype(np.int64)
        parts = layer.input_parts(layer.weight_int) if layer.split else [layer.weight_int]
        np.testing.assert_array_equal(stored.T if stored.ndim == 2 else stored, parts[0].numpy().astype(np.int64))


@pytest.mark.parametrize("quantization, needles", [
    (dict(w_bits_by_layer={"conv1": 9}), ("quantization.w_bits_by_layer.conv1", "2 to 8")),
    (dict(mixed_precision_budget=1.5), ("quantization.mixed_precision_budget", "0 to 1")),
    (dict(w_bits=8, mixed_precision_budget=0.05), ("mixed_precision_budget", "w_bits is already 8")),
    (dict(w_bits_by_layer={"conv_nosuch": 8}), ("quantization.w_bits_by_layer entry 'conv_nosuch' matches no layer",)),
])
def test_bad_mixed_precision_settings_fail_in_one_line(write_recipe, tmp_path, capsys, quantization, needles):
    recipe = write_recipe(quantization=dict(dict(w_bits=4, a_bits=8), **quantization))
    rc = main(["quantize", recipe, "--out", str(tmp_path / "q"), "--quiet"])
    assert_one_error_line(rc, capsys.readouterr().err, *needles)
    assert not (tmp_path / "q").exists()


def test_user_pinned_layers_are_not_candidates(tiny_model_dir):
    from diffusers import UNet2DModel

    from gaq_backend.calibration.calibration_set import calibration_from_tensors
    from gaq_backend.config import QuantConfig
    from gaq_backend.algorithms.minmax import MinMaxConfig
    from gaq_backend.wrapping.mixed_precision import choose_high_precision_layers

    unet = UNet2DModel.from_pretrained(tiny_model_dir).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 16, 16, generator=gen)
    t = torch.tensor([900, 900, 900, 900, 100, 100, 100, 100])
    raw = dict(x=x, t=t, eps=torch.zeros_like(x), step=(t < 500).long(), timesteps=torch.tensor([900, 100]))
    calib = calibration_from_tensors(raw, 0.25, 2, 0)
    config = QuantConfig(w_bits=4, a_bits=8, w_bits_by_layer={"conv2": 8}, mixed_precision_budget=0.5, algorithm=MinMaxConfig())
    choice = choose_high_precision_layers(unet, config, calib)
    assert choice.rows == 3 and not any(n.endswith("conv2") for n in choice.costs)
    assert choice.chosen and not any(n.endswith("conv2") for n in choice.chosen)


@pytest.mark.parametrize("seed", range(4))   # DiT, PixArt, SD3, Flux
def test_diffusion_transformers_get_mixed_weights_that_reload_and_export(tmp_path, seed):
    import transformer_zoo

    r = transformer_zoo.run_case(transformer_zoo.generate(seed), str(tmp_path), "minmax", 4, 8, export="int4",
                                 mixed_precision_budget=0.1)
    q = r["model"]
    wide = {n for n, m in quant_layers(q) if m.weight_quantizers[0].bits == 8}
    assert wide and set(q.gaq_info.config.w_bits_by_layer.values()) == {8}
    assert {n.lstrip("=") for n in q.gaq_info.config.w_bits_by_layer} == wide
    assert r["reload_rel_error"] == pytest.approx(r["rel_error"], rel=1e-5)
    assert r["parity"]["max_steps"] <= r["parity"]["bounds"]["max_steps"]
