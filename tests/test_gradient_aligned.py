import json
import math

import pytest
import torch
from torch import nn

from gaq_backend import QuantConfig, quantize
from gaq_backend.algorithms import GradientAlignedConfig, UniformConfig
from gaq_backend.algorithms.block_cache import BlockData
from gaq_backend.algorithms.blocks import ReconUnit
from gaq_backend.algorithms.gradient_aligned import (UnitProbe, alignment_loss, learn_sample_weights, outer_step,
                                                     softmax_vjp)
from gaq_backend.config import ConfigError
from gaq_backend.wrapping import QuantConv2d, QuantLinear, quant_layers, quantizers


def _linear_unit(dtype=torch.float64, seed=0, cin=6, cout=5):
    torch.manual_seed(seed)
    layer = QuantLinear.from_float(nn.Linear(cin, cout), 4, 32).to(dtype)
    for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
        q.fit(w.detach(), "max")
    layer.requires_grad_(False)
    return ReconUnit("lin", layer, "layer")


def _data(layer, n, seed=1, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layer.in_features, generator=g, dtype=layer.weight.dtype)
    with torch.no_grad():
        target = nn.functional.linear(x, layer.weight, layer.bias)
    target = target + noise * torch.randn(target.shape, generator=g, dtype=target.dtype)
    return BlockData([x], {}, target, torch.zeros(n, dtype=torch.long))


def test_softmax_vjp_matches_autograd_and_alignment_loss_formula():
    s = torch.randn(7, dtype=torch.float64, requires_grad=True)
    d = torch.randn(7, 3, dtype=torch.float64)
    w = torch.softmax(s / 0.5, 0)
    for k in range(3):
        (auto,) = torch.autograd.grad(w @ d[:, k], s, retain_graph=True)
        assert torch.allclose(softmax_vjp(w, d, 0.5)[:, k], auto)
    gw = torch.randn(7, 3, dtype=torch.float64)
    dots = [gw[:, 0] @ gw[:, 1], gw[:, 0] @ gw[:, 2], gw[:, 1] @ gw[:, 2]]
    assert float(alignment_loss(gw, "dot")) == pytest.approx(-float(sum(dots)) / 3)
    assert float(alignment_loss(gw * 10, "cosine")) == pytest.approx(float(alignment_loss(gw, "cosine")))


@pytest.mark.parametrize("order", ["first", "second"])
def test_meta_gradient_matches_finite_differences(order):
    """d L_val(theta'(s)) / d s_j from outer_step against central differences of the actual one-step objective."""
    unit = _linear_unit()
    data = _data(unit.module, 24)
    train, val = data.subset(torch.arange(16)), data.subset(torch.arange(16, 24))
    val_groups = [torch.arange(0, 4), torch.arange(4, 8)]
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    cfg = GradientAlignedConfig(validation="mse", order=order, inner_lr=1e-4 if order == "first" else 1e-2,
                                fd_step=1e-6, tau=0.7)
    probe = UnitProbe(unit)
    try:
        theta = [t.detach() for t in probe.theta]
        s = torch.randn(16, dtype=torch.float64) * 0.3
        idx = torch.tensor([0, 3, 5, 8, 11, 15])
        step = outer_step(probe, theta, s, idx, train, val, val_groups, p, cfg)

        def objective(logits):  # the exact one-step validation loss with the step size held at step.eta
            th = [t.clone().requires_grad_(True) for t in theta]
            w = torch.softmax(logits / cfg.tau, 0)
            inner = (probe.losses(th, train, idx) * (16 * w[idx])).mean()
            g = torch.autograd.grad(inner, th)
            th2 = [t.detach() - step.eta * x for t, x in zip(th, g)]
            return sum(float(pi) * float(probe.losses(th2, val, v).mean()) for pi, v in zip(p, val_groups))

        h = 1e-4
        for j in (0, 3, 7, 15):  # in the batch, and not (7: moves only through the softmax normaliser)
            e = torch.zeros(16, dtype=torch.float64)
            e[j] = h
            fd = (objective(s + e) - objective(s - e)) / (2 * h)
            assert float(step.grad_s[j]) == pytest.approx(fd, rel=2e-3 if order == "second" else 2e-2, abs=1e-12)
    finally:
        probe.close()


def test_sample_whose_gradient_opposes_the_validation_groups_loses_weight():
    unit = _linear_unit(torch.float32)
    layer = unit.module
    n_train = 32
    data = _data(layer, n_train + 16, noise=0.0)
    # the bad sample's target pulls the weights away from what every validation group asks for
    data.target[5] = data.target[5] + 3.0 * torch.sign(data.target[5])
    train_mask = torch.zeros(n_train + 16, dtype=torch.bool)
    train_mask[:n_train] = True
    group = torch.cat([torch.arange(n_train) % 2, torch.arange(16) % 2])
    cfg = GradientAlignedConfig(outer_iters=30, outer_batch_size=n_train, outer_lr=0.05, diagnostics=False)
    result = learn_sample_weights(unit, data, train_mask, group, cfg, torch.Generator().manual_seed(0))
    f = result.factors
    assert f[5] < 1.0 and f[5] == f.min(), f
    assert float(f.sum()) == pytest.approx(n_train, rel=1e-5)
    assert layer.weight_rounding is None  # the probe leaves the layer as it found it


def _calib(tiny_model_dir, tmp_path):
    import json
    import os

    from gaq_backend.calibration import capture_calibration
    from gaq_backend.config import CalibrationConfig, SamplerConfig
    from gaq_backend.models.embedded import load_unet

    sched = json.load(open(os.path.join(tiny_model_dir, "scheduler_config.json")))
    calib, _ = capture_calibration(load_unet(tiny_model_dir), sched, SamplerConfig(num_inference_steps=10),
                                   CalibrationConfig(n_per_step=4, interval=2, n_groups=2, val_fraction=0.25,
                                                     cache_dir=str(tmp_path)), progress=False)
    return calib, load_unet


def _state(model):
    return ([l.weight_int.clone() for _, l in quant_layers(model) if l.weight_int is not None],
            [q.scale.clone() for _, q in quantizers(model, "act") if q.enabled])


def test_equal_weights_reproduce_uniform_exactly(tiny_model_dir, tmp_path):
    calib, load_unet = _calib(tiny_model_dir, tmp_path)
    common = dict(iters=6, act_iters=4, batch_size=4)
    ref = quantize(load_unet(tiny_model_dir), QuantConfig(w_bits=4, a_bits=8, keep_fp=[], algorithm=UniformConfig(**common)),
                   calib, progress=False)
    # zero outer steps: every logit stays at its initial value, so every factor is exactly 1.0
    ga = quantize(load_unet(tiny_model_dir), QuantConfig(w_bits=4, a_bits=8, keep_fp=[],
                  algorithm=GradientAlignedConfig(outer_iters=0, **common)), calib, progress=False)
    (wi_r, s_r), (wi_g, s_g) = _state(ref), _state(ga)
    assert len(wi_r) == len(wi_g) > 0
    assert all(torch.equal(a, b) for a, b in zip(wi_r, wi_g))
    assert all(torch.equal(a, b) for a, b in zip(s_r, s_g))
    units = ga.gaq_info.stats.sample_weights.summary()["units"]
    assert all(u.get("factor_min", 1.0) == 1.0 == u.get("factor_max", 1.0) for u in units.values())


def test_learned_weights_differ_from_uniform_and_diagnostics_are_reported(tiny_model_dir, tmp_path):
    calib, load_unet = _calib(tiny_model_dir, tmp_path)
    model = quantize(load_unet(tiny_model_dir), QuantConfig(w_bits=4, a_bits=8, keep_fp=[],
                     algorithm=GradientAlignedConfig(iters=4, act_iters=2, batch_size=4, outer_iters=3, outer_batch_size=8,
                                                     alignment="cosine")), calib, progress=False)
    units = model.gaq_info.stats.sample_weights.summary()["units"]
    learned = [u for u in units.values() if "entropy" in u]
    assert learned and all(0.0 < u["entropy"] <= 1.0 for u in learned)
    assert any(u["factor_max"] > 1.0 > u["factor_min"] for u in learned)
    assert all(len(u["cos_dist_matrix_before"]) == 2 and math.isfinite(u["cos_dist_after"]) for u in learned)
    assert all(u["gm_to_mse_grad_ratio"] > 0 for u in learned)


def test_recipe_run_writes_weights_and_figures(write_recipe, tmp_path):
    from gaq_backend.pipeline import run_recipe
    from gaq_backend.recipe import load_recipe

    path = write_recipe(algorithm="gradient_aligned", settings=dict(iters=2, act_iters=2, batch_size=4, outer_iters=2,
                                                                   outer_batch_size=8))
    out = tmp_path / "out"
    rep = run_recipe(load_recipe(path), str(out), progress=False, log=lambda *_: None)
    json.dumps(rep["algorithm_stats"])  # plain data, no callbacks
    from safetensors.torch import load_file

    weights = load_file(out / "sample_weights.safetensors")
    factors = {k: v for k, v in weights.items() if k.startswith("factors/")}
    assert factors and all(v.shape == weights["t"].shape == weights["group"].shape for v in factors.values())
    for png in ("weight_vs_alignment.png", "group_gradient_distance.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("bad", [dict(tau=0.0), dict(outer_lr=-1.0), dict(outer_iters=-1), dict(outer_batch_size=0)])
def test_bad_settings_are_refused_with_the_key_named(bad):
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=key):
        GradientAlignedConfig(**bad)


def test_unknown_alignment_value_is_refused_from_a_recipe(write_recipe):
    from gaq_backend.recipe import load_recipe

    with pytest.raises(ConfigError, match="alignment"):
        load_recipe(write_recipe(algorithm="gradient_aligned", settings=dict(alignment="angle"))).quant_config()


def test_missing_validation_group_is_a_clear_error():
    unit = _linear_unit(torch.float32)
    data = _data(unit.module, 12)
    train_mask = torch.ones(12, dtype=torch.bool)
    train_mask[-2:] = False
    group = torch.tensor([0] * 6 + [1] * 6)
    group[-2:] = 0  # group 1 has no validation sample
    with pytest.raises(ConfigError, match="validation samples in every timestep group"):
        learn_sample_weights(unit, data, train_mask, group, GradientAlignedConfig(outer_iters=1), torch.Generator())


def test_conv_unit_probe_restores_the_layer():
    torch.manual_seed(0)
    layer = QuantConv2d.from_float(nn.Conv2d(3, 4, 3, padding=1), 4, 32)
    for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
        q.fit(w.detach(), "max")
    probe = UnitProbe(ReconUnit("conv", layer, "layer"))
    assert probe.names == ["weight_rounding.V.0"]
    probe.close()
    assert layer.weight_rounding is None
