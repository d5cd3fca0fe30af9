"""``timestep_weighting: sampling``: each step's sensitivity of the final sample, and the factors built from it."""
import dataclasses

import pytest
import torch

from conftest import TINY_UNET
from gaq_backend.calibration import capture_calibration
from gaq_backend.calibration.calibration_set import RecordingSampler
from gaq_backend.calibration.step_sensitivity import step_sensitivity
from gaq_backend.config import CalibrationConfig, SamplerConfig
from gaq_backend.sampling import make_scheduler

SCHED = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False)


def _tiny(seed=0, zero_output=False):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**TINY_UNET).eval()
    if zero_output:  # eps = 0 everywhere: each DDIM step is then linear in x_t and its gain is known in closed form
        torch.nn.init.zeros_(unet.conv_out.weight), torch.nn.init.zeros_(unet.conv_out.bias)
    return unet


def _calib(unet, tmp_path):
    cfg = CalibrationConfig(n_per_step=8, interval=2, n_groups=5, val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    calib, _ = capture_calibration(unet, SCHED, SamplerConfig(num_inference_steps=10), cfg, progress=False)
    return calib


def test_sensitivity_is_the_closed_form_gain_of_a_linear_sampler(tmp_path):
    """With eps = 0, DDIM maps x_t to sqrt(a_prev / a_t) x_t, and an error d in eps at step t adds
    (sqrt(1 - a_prev) - sqrt(a_prev (1 - a_t) / a_t)) d; the later steps scale that by sqrt(a_final / a_prev)."""
    unet = _tiny(zero_output=True)
    calib = _calib(unet, tmp_path)
    sens = step_sensitivity(unet, calib, rows=6)
    sched = make_scheduler(SCHED, SamplerConfig(num_inference_steps=10))
    ts = [int(t) for t in sched.timesteps]
    acp = sched.alphas_cumprod.double()
    assert sorted(sens, reverse=True) == [float(t) for t in ts[::2]]
    for t, s in sens.items():
        i = ts.index(int(t))
        a, a_prev = acp[int(t)], (acp[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64))
        gain = ((1 - a_prev).sqrt() - (a_prev * (1 - a) / a).sqrt()) * (1.0 / a_prev).sqrt()
        assert s == pytest.approx(float(gain ** 2), rel=0.15), (t, s, float(gain ** 2))  # 6 rows x 256 pixels of noise


def test_sensitivity_is_deterministic_and_needs_the_recording_sampler(tmp_path):
    unet = _tiny()
    calib = _calib(unet, tmp_path)
    a, b = step_sensitivity(unet, calib, rows=4), step_sensitivity(unet, calib, rows=4)
    assert a == b and all(v > 0 and v == v for v in a.values())
    with pytest.raises(ValueError, match="recorded by gaq's own sampler"):
        step_sensitivity(unet, dataclasses.replace(calib, recorded_by=None))
    off_grid = dataclasses.replace(calib, recorded_by=RecordingSampler(SCHED, SamplerConfig(num_inference_steps=7)))
    with pytest.raises(ValueError, match="not a step of its sampler"):
        step_sensitivity(unet, off_grid)


def test_timestep_factors_follow_the_sensitivity_and_average_one(tmp_path, monkeypatch):
    import gaq_backend.calibration.step_sensitivity as ss
    from gaq_backend.algorithms import UniformConfig
    from gaq_backend.algorithms.reconstruction import _combined, timestep_factors

    calib = _calib(_tiny(), tmp_path)
    fake = {t: 4.0 ** k for k, t in enumerate(sorted({float(v) for v in calib.t.tolist()}))}  # 1, 4, 16, ... by t
    monkeypatch.setattr(ss, "step_sensitivity", lambda model, c, rows, seed: fake)
    train = ~calib.is_val
    f = timestep_factors(torch.nn.Identity(), calib, UniformConfig(timestep_weight_power=0.5), train, None)
    assert f.shape == (int(train.sum()),) and float(f.double().mean()) == pytest.approx(1.0, abs=1e-6)
    t = calib.t[train]
    lo, hi = float(t.min()), float(t.max())
    assert float(f[t == hi][0] / f[t == lo][0]) == pytest.approx((fake[hi] / fake[lo]) ** 0.5, rel=1e-5)
    flat = timestep_factors(torch.nn.Identity(), calib, UniformConfig(timestep_weight_power=0.0), train, None)
    assert torch.equal(flat, torch.ones_like(flat))
    learned = torch.linspace(0.5, 1.5, len(f))
    both = _combined(learned, f)
    assert float(both.double().mean()) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(both / both[0], (learned * f) / (learned[0] * f[0]), rtol=1e-5)
    assert _combined(None, f) is f and _combined(learned, None) is learned


def test_a_weighted_recipe_quantizes_differently_from_an_unweighted_one(write_recipe, tmp_path):
    from safetensors.torch import load_file

    from gaq_backend.cli import main

    codes = {}
    for w in ("none", "sampling"):
        recipe = write_recipe(algorithm="uniform", settings=dict(iters=20, act_iters=10, batch_size=16, timestep_weighting=w))
        out = tmp_path / w
        assert main(["quantize", recipe, "--out", str(out), "--quiet"]) == 0
        codes[w] = {k: v for k, v in load_file(out / "quantized_unet.safetensors").items() if k.endswith("weight_int")}
    assert codes["none"].keys() == codes["sampling"].keys() and codes["none"]
    assert any(not torch.equal(codes["none"][k], codes["sampling"][k]) for k in codes["none"])


# -- quantization.output_correction --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bias", "affine"])
def test_output_correction_is_the_least_squares_fit_per_timestep_reloads_and_exports(kind, tmp_path):
    """On the rows it was fitted on, the corrected error is orthogonal to the fit's columns per timestep and channel
    (the mean error is 0; for affine, also uncorrelated with the output and the input); the table is saved with the
    weights, applied after a reload and traced into the ONNX graph, whose outputs follow the table's timestep."""
    import json

    import numpy as np
    from test_export import _quantize_tiny

    from exporters.onnx_export import build_quantized_onnx, export_quantized
    from exporters.ort_runtime import create_session, predict_noise
    from gaq_backend import load_quantized
    from gaq_backend.models import load_unet
    from gaq_backend.quantizers.output_correction import MODULE_NAME
    from gaq_backend.sampling import unet_forward

    d = _quantize_tiny(str(tmp_path), kind, TINY_UNET, quantization=dict(w_bits=3, a_bits=8, output_correction=kind))
    rep = json.loads(open(f"{d}/report.json").read())["algorithm_stats"]["output_correction"]
    assert rep["kind"] == kind and rep["train_mse_after"] < rep["train_mse_before"]
    model, sched, recipe = load_quantized(d)
    table = getattr(model, MODULE_NAME)
    assert table.t.tolist() == rep["timesteps"]
    assert (table.coef[..., 0] == 1).all() and (table.coef[..., 1] == 0).all() if kind == "bias" else (table.coef[..., 1] != 0).any()
    calib, _ = capture_calibration(load_unet(recipe.model), sched, recipe.sampler, recipe.calibration, progress=False)
    train = calib.train
    with torch.no_grad():
        fitted = table.coef.clone()
        table.coef.zero_()[..., 0] = 1.0                                                 # the identity map: raw outputs
        uncorrected = {t: unet_forward(model, r.x, r.t) for t, r in
                       ((t, train.subset(train.t.double() == t)) for t in rep["timesteps"])}
        table.coef.copy_(fitted)
        sse = count = 0
        for t in rep["timesteps"]:
            rows = train.subset(train.t.double() == t)
            err = (unet_forward(model, rows.x, rows.t) - rows.eps.float()).double()
            sse, count = sse + float(err.pow(2).sum()), count + err.numel()
            scale = float(err.abs().max()) * err.numel()
            assert abs(float(err.sum())) < 1e-4 * scale                                   # mean error 0
            if kind == "affine":
                assert abs(float((err * uncorrected[t]).sum())) < 1e-4 * scale * float(uncorrected[t].abs().max())
                assert abs(float((err * rows.x).sum())) < 1e-4 * scale * float(rows.x.abs().max())
        assert rep["train_mse_after"] == pytest.approx(sse / count, rel=1e-3)   # the report's figure is this error
    # the exported graph applies it too: the same outputs as PyTorch, and a timestep's own entry is used
    res = export_quantized(d, str(tmp_path / f"{kind}.onnx"), "int8", progress=False)
    assert res.parity["mean_steps"] <= res.parity["bounds"]["mean_steps"]
    table.coef[..., 2] = torch.tensor([10.0 * (i + 1) for i in range(len(table.t))]).unsqueeze(1)   # make c dominate
    sess = create_session(build_quantized_onnx(model, "int8", 21, {}))
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([int(table.t[0]), int(table.t[-1])])
    with torch.no_grad():
        want = model(x, t).sample.numpy()
    got = predict_noise(sess, x.numpy(), t.numpy())
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()
    assert want[1].mean() > want[0].mean() + 5   # the last entry's c is 10 x (n - 1) above the first's


@pytest.mark.parametrize("kind", ["bias", "affine"])
def test_trajectory_fit_is_the_least_squares_fit_on_the_quantized_models_own_inputs(kind, tmp_path):
    """``output_correction_fit: trajectory``: same weights as the calibration fit (the same seed), and the table is
    the least-squares fit on the inputs the calibration-fitted model visits in the sampling loop, against the FP model
    at those inputs: the refit's error there is orthogonal to the fit's columns at every table entry."""
    import copy

    import gaq_backend as gaq
    from gaq_backend.calibration.capture import unet_sampling_loop
    from gaq_backend.quantizers.output_correction import MODULE_NAME
    from gaq_backend.quantizers.timestep import call_sample_and_timestep

    cfg = CalibrationConfig(n_per_step=8, interval=2, n_groups=5, val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    fp = _tiny()
    loop = unet_sampling_loop(fp, SCHED, SamplerConfig(num_inference_steps=10), cfg, progress=False)
    models = {}
    for fit in ("calibration", "trajectory"):
        qcfg = gaq.preset("W4A8", algorithm=gaq.MinMaxConfig(), output_correction=kind, output_correction_fit=fit)
        models[fit] = gaq.quantize(copy.deepcopy(fp), qcfg, _calib(fp, tmp_path), progress=False, sampling_loop=loop)
    a, b = models["calibration"], models["trajectory"]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()) if p.shape != getattr(a, MODULE_NAME).coef.shape)
    refit = getattr(b, MODULE_NAME)
    rep = b.gaq_info.stats.output_correction["trajectory"]
    assert rep["mse_after"] < rep["mse_before"] and rep["values"] > 0
    assert not torch.equal(refit.coef, getattr(a, MODULE_NAME).coef)
    rows = []   # (entry, raw output, input, FP output) of every call of the calibration-fitted model's own loop

    def record(module, args, kwargs, out):
        x, t = call_sample_and_timestep(module, args, kwargs)
        rows.append((refit.entry(t).expand(x.shape[0]), out.sample.double(), x.double(), fp(*args, **kwargs).sample.double()))

    handle = a.register_forward_hook(record, with_kwargs=True, prepend=True)
    loop(a)
    handle.remove()
    entry, raw, x, target = (torch.cat(v) for v in zip(*rows))
    assert len(entry.unique()) == len(refit.t)
    coef = refit.coef.double()[entry]                                                    # [N, C=1, 3]
    err = coef[..., 0, None, None] * raw + coef[..., 1, None, None] * x + coef[..., 2, None, None] - target
    for i in entry.unique():
        m = entry == i
        scale = float(err[m].abs().max()) * err[m].numel()
        assert abs(float(err[m].sum())) < 1e-6 * scale                                   # mean error 0 at each entry
        if kind == "affine":
            assert abs(float((err[m] * raw[m]).sum())) < 1e-6 * scale * float(raw[m].abs().max())
            assert abs(float((err[m] * x[m]).sum())) < 1e-6 * scale * float(x[m].abs().max())


def test_trajectory_fit_needs_a_correction_and_a_loop(tmp_path):
    import gaq_backend as gaq
    from gaq_backend.config import ConfigError

    with pytest.raises(ConfigError, match="set quantization.output_correction to bias or affine"):
        gaq.preset("W4A8", algorithm=gaq.MinMaxConfig(), output_correction_fit="trajectory").check()
    qcfg = gaq.preset("W4A8", algorithm=gaq.MinMaxConfig(), output_correction="bias", output_correction_fit="trajectory")
    with pytest.raises(ConfigError, match="give forward_loop= or sampling_loop="):
        gaq.quantize(_tiny(), qcfg, _calib(_tiny(), tmp_path), progress=False)
    from torchao.quantization import quantize_

    with pytest.raises(ConfigError, match="give forward_loop= or sampling_loop="):   # at prepare, before any pass
        quantize_(_tiny(), gaq.GAQConfig(qcfg, step="prepare"), filter_fn=lambda m, fqn: fqn == "")


def test_a_trajectory_fitted_recipe_reports_the_refit_and_reloads_it(tmp_path):
    """``gaq quantize`` re-runs its own capture loop for the refit; the folder reloads with the refitted table."""
    import json

    from test_export import _quantize_tiny

    from gaq_backend import load_quantized
    from gaq_backend.quantizers.output_correction import MODULE_NAME

    d = _quantize_tiny(str(tmp_path), "traj", TINY_UNET,
                       quantization=dict(w_bits=4, a_bits=8, output_correction="affine", output_correction_fit="trajectory"))
    rep = json.loads(open(f"{d}/report.json").read())["algorithm_stats"]["output_correction"]["trajectory"]
    assert rep["values"] > 0 and rep["mse_after"] < rep["mse_before"]
    model, _, _ = load_quantized(d)
    coef = getattr(model, MODULE_NAME).coef
    assert [float(coef[..., 0].min()), float(coef[..., 0].max())] == pytest.approx(rep["a"], rel=1e-6)
