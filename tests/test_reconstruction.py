import pytest
import torch
from torch import nn

from gaq_backend import QuantConfig, quantize
from gaq_backend.algorithms import TemporalConfig, UniformConfig
from gaq_backend.algorithms.block_cache import BlockData
from gaq_backend.algorithms.blocks import reconstruction_units
from gaq_backend.algorithms.reconstruction import Shard, per_sample_lp, reconstruct_unit, sample_factors, sharded_loss
from gaq_backend.algorithms.blocks import ReconUnit
from gaq_backend.algorithms.temporal import time_path_layers
from gaq_backend.quantizers.adaround import AdaRound
from gaq_backend.quantizers.timestep import current_timesteps
from gaq_backend.wrapping import QuantConv2d, quant_layers, wrap_unet

from test_wrapping import COND_CONFIG, UNET2D_CONFIGS


def _all_models():
    from diffusers import UNet2DConditionModel, UNet2DModel

    return [UNet2DModel(**c) for c in UNET2D_CONFIGS] + [UNet2DConditionModel(**COND_CONFIG)]


@pytest.mark.parametrize("idx", range(len(UNET2D_CONFIGS) + 1))
def test_every_wrapped_layer_is_in_exactly_one_unit(idx):
    model = _all_models()[idx]
    wrap_unet(model, 4, 8, [])
    units = reconstruction_units(model)
    owners = [n for u in units for n, _ in u.layers()]
    assert sorted(owners) == sorted(n for n, _ in quant_layers(model))
    assert len(owners) == len(set(owners))
    kinds = {type(u.module).__name__ for u in units if u.kind == "block"}
    assert "ResnetBlock2D" in kinds and ({"Attention", "Transformer2DModel"} & kinds or idx == 2)
    # with the temporal block taken out, its layers belong to no unit, the rest still exactly once
    tib = time_path_layers(model)
    owners = [n for u in reconstruction_units(model, tuple(tib)) for n, _ in u.layers()]
    assert sorted(owners) == sorted(n for n, _ in quant_layers(model) if n not in tib)


def _conv_layer(seed=0, cin=4, cout=6):
    torch.manual_seed(seed)
    layer = QuantConv2d.from_float(nn.Conv2d(cin, cout, 3, padding=1), 4, 32)
    for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
        q.fit(w.detach(), "max")
    return layer


def test_adaround_initial_soft_weights_equal_the_float_weights():
    layer = _conv_layer()
    ada = AdaRound(layer)
    q = layer.weight_quantizers[0]
    frac = layer.weight / q.scale - torch.floor(layer.weight / q.scale)
    assert torch.allclose(ada.h(ada.V[0]), frac, atol=1e-5)
    soft = ada(layer)[0]
    inside = (layer.weight / q.scale).abs() < 7
    assert torch.allclose(soft[inside], layer.weight[inside], atol=1e-6)


def test_hard_rounding_puts_every_weight_on_its_grid():
    layer = _conv_layer()
    layer.weight_rounding = AdaRound(layer)
    with torch.no_grad():
        layer.weight_rounding.V[0].normal_()
    layer.freeze_weight()
    q = layer.weight_quantizers[0]
    codes = layer.weight / q.scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert torch.equal(layer.weight_int.float(), codes.round()) and layer.weight_int.min() >= -8 and layer.weight_int.max() <= 7
    # each weight rounded to one of its two neighbouring grid points
    floor = torch.floor(_conv_layer().weight.detach() / q.scale)
    down, up = floor.clamp(-8, 7), (floor + 1).clamp(-8, 7)
    assert ((layer.weight_int == down) | (layer.weight_int == up)).all()


def _block_data(layer, n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layer.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        target = nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
    return BlockData([x], {}, target, torch.zeros(n, dtype=torch.long))


def test_block_reconstruction_error_falls_over_iterations():
    """The error of the hard-rounded block falls as AdaRound runs longer; 0 iterations is round-to-nearest."""
    errors = []
    for iters in (0, 100, 400):
        layer = _conv_layer(cin=8, cout=8)
        data = _block_data(layer)
        info = reconstruct_unit(ReconUnit("conv", layer, "layer"), data, UniformConfig(iters=iters, act_iters=0, lr=1e-2), a_bits=32)
        assert len(info["curve"]) == iters
        with torch.no_grad():
            errors.append(float((data.run(layer, torch.arange(64))[0] - data.target).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.995 * errors[0]


def test_activation_step_sizes_reduce_block_error():
    layer = QuantConv2d.from_float(nn.Conv2d(8, 8, 3, padding=1), 8, 4)
    data = _block_data(layer)
    for w, q in zip(layer.weight_parts(), layer.weight_quantizers):
        q.fit(w.detach())
    layer.act_quantizers[0].fit(data.args[0])  # min/max range: coarse at 4 bits
    with torch.no_grad():
        before = float((data.run(layer, torch.arange(64))[0] - data.target).pow(2).mean())
    reconstruct_unit(ReconUnit("conv", layer, "layer"), data, UniformConfig(iters=0, act_iters=200, act_lr=1e-2), a_bits=4)
    with torch.no_grad():
        after = float((data.run(layer, torch.arange(64))[0] - data.target).pow(2).mean())
    assert after < 0.8 * before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rounding_in_place_keeps_one_tensor_and_the_same_codes(dtype):
    """Block reconstruction writes the rounded weight into the float weight and drops the codes when they read
    back exactly (the final freeze derives them again); otherwise (bf16 at 8 bits) it keeps them."""
    reference, layer = _conv_layer(), _conv_layer()
    for l in (reference, layer):
        l.to(dtype)
        l.weight_rounding = AdaRound(l)
        with torch.no_grad():
            l.weight_rounding.V[0].copy_(torch.randn(l.weight.shape, generator=torch.Generator().manual_seed(1)))
    reference.freeze_weight()
    layer.round_in_place()
    assert layer.weight_rounding is None and torch.equal(layer.weight, reference.weight)
    assert layer.weight_int is None or torch.equal(layer.weight_int, reference.weight_int)
    if dtype != torch.bfloat16:
        assert layer.weight_int is None
    with torch.no_grad():
        assert torch.equal(layer.quantized_weight(), reference.quantized_weight())
    layer.freeze_weight()
    assert torch.equal(layer.weight_int, reference.weight_int) and torch.equal(layer.weight, reference.weight)


def test_uniform_sample_weights_reproduce_the_unweighted_reconstruction_exactly():
    results = []
    for factors in (None, sample_factors(torch.full((64,), 1 / 64)), sample_factors(torch.softmax(torch.zeros(64), 0))):
        layer = _conv_layer(cin=8, cout=8)
        info = reconstruct_unit(ReconUnit("conv", layer, "layer"), _block_data(layer), UniformConfig(iters=50, act_iters=0), 32, factors)
        results.append((info["curve"], layer.weight.detach().clone()))  # the rounded weight, in place
    for curve, w in results[1:]:
        assert curve == results[0][0] and torch.equal(w, results[0][1])
    loss = torch.rand(10)
    whole = Shard(torch.arange(37))
    assert torch.equal(sharded_loss(lambda i: loss, whole, sample_factors(torch.full((37,), 1 / 37)), torch.arange(10)), loss.mean())
    uneven = sample_factors(torch.softmax(torch.randn(37), 0))
    assert not torch.equal(sharded_loss(lambda i: loss, whole, uneven, torch.arange(10)), loss.mean())


def test_the_parts_of_a_sharded_batch_sum_to_its_mean():
    """Two ranks holding rows 0::2 and 1::2 of 12 training rows (two validation rows interleaved): their parts of
    a batch's weighted loss sum to the mean one process computes; a rank holding no row of the batch has none."""
    is_val = torch.zeros(14, dtype=torch.bool)
    is_val[[3, 8]] = True
    per_row = torch.rand(12)
    factors = sample_factors(torch.softmax(torch.randn(12), 0))
    idx = torch.tensor([0, 5, 5, 11, 2, 7])
    shards = [Shard.of(is_val, torch.arange(r, 14, 2)) for r in (0, 1)]
    train_rows = (~is_val).nonzero().flatten()
    parts = []
    for r, shard in enumerate(shards):
        mine = train_rows[train_rows % 2 == r]   # this rank's training rows, in order
        parts.append(sharded_loss(lambda i: per_row[torch.searchsorted(train_rows, mine[i])], shard, factors, idx))
    assert torch.allclose(parts[0] + parts[1], (per_row[idx] * factors[idx]).mean())
    other = int((shards[0].local < 0).nonzero()[0])   # a row only rank 1 holds
    assert sharded_loss(lambda i: per_row[i], shards[0], None, torch.tensor([other])) is None
    assert sharded_loss(lambda i: per_row[i], shards[1], None, torch.tensor([other])) is not None


def test_per_sample_lp_matches_brecq_reduction():
    a, b = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    assert torch.allclose(per_sample_lp(a, b, 2.0).mean(), (a - b).abs().pow(2).sum(1).mean())


def test_timestep_table_is_used_at_the_right_timestep():
    from gaq_backend.quantizers import UniformQuantizer

    q = UniformQuantizer(8, symmetric=True)
    q.set_timestep_ranges(torch.tensor([1, 501, 981]), torch.tensor([-1.0, -10.0, -100.0]), torch.tensor([1.0, 10.0, 100.0]))
    x = torch.full((3, 4), 0.3)
    with current_timesteps(torch.tensor([981, 1, 501])):
        out = q(x)
    steps = torch.tensor([100.0, 1.0, 10.0]) / 128
    assert torch.allclose(out[:, 0], torch.round(0.3 / steps) * steps)
    with current_timesteps(torch.tensor([990])):  # not in the table: nearest entry (981)
        assert torch.allclose(q(torch.tensor([[50.0]])), torch.round(torch.tensor(50.0) / (100 / 128)) * (100 / 128))
    with pytest.raises(RuntimeError, match="current timestep"):
        q(x)


def test_temporal_fits_one_range_per_sampler_timestep_and_selects_it_in_the_unet(tiny_model_dir, tmp_path):
    import json, os
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.config import CalibrationConfig, SamplerConfig
    from gaq_backend.models import load_unet

    sched = json.load(open(os.path.join(tiny_model_dir, "scheduler_config.json")))
    calib, _ = capture_calibration(load_unet(tiny_model_dir), sched, SamplerConfig(num_inference_steps=10),
                                   CalibrationConfig(n_per_step=4, interval=2, n_groups=2, val_fraction=0.25, cache_dir=str(tmp_path)), progress=False)
    model = quantize(load_unet(tiny_model_dir), QuantConfig(w_bits=4, a_bits=8, keep_fp=[],
                     algorithm=TemporalConfig(iters=2, act_iters=2, tib_iters=5)), calib, progress=False)
    q = model.time_embedding.linear_1.act_quantizers[0]
    assert q.timestep_ranges is not None and sorted(q.timestep_ranges.t.tolist()) == sorted(calib.timesteps.tolist())
    # the UNet call publishes its timestep: quantizer scales used inside equal the table entry for that t
    used = []
    orig = q.timestep_ranges.lookup
    q.timestep_ranges.lookup = lambda x: used.append(orig(x)[0].flatten()) or orig(x)
    t = int(calib.timesteps[3])
    with torch.no_grad():
        model(torch.randn(2, 1, 16, 16), torch.tensor([t, t]))
    k = q.timestep_ranges.t.tolist().index(t)
    assert torch.allclose(used[0], q.timestep_ranges.scale[k].expand(2))
    # ranges differ across timesteps (the sinusoidal input changes with t)
    assert q.timestep_ranges.scale.unique().numel() > 1


@pytest.mark.parametrize("algorithm", ["uniform", "temporal"])
def test_recipe_end_to_end_reduces_block_error_and_reloads_exactly(algorithm, write_recipe, tmp_path):
    import json
    from gaq_backend import load_quantized
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.cli import main
    from gaq_backend.evaluation import noise_mse
    from gaq_backend.models import load_unet

    settings = dict(iters=30, act_iters=15, **({"tib_iters": 20} if algorithm == "temporal" else {}))
    recipe = write_recipe(algorithm=algorithm, settings=settings)
    out = tmp_path / "out"
    assert main(["quantize", recipe, "--out", str(out), "--quiet", "--set", "quantization.keep_fp=[conv_in]"]) == 0
    rep = json.loads((out / "report.json").read_text())
    blocks = rep["algorithm_stats"]["blocks"]
    assert sum(b["mse_after"] for b in blocks.values()) < sum(b["mse_before"] for b in blocks.values())
    assert all(b["seconds_reconstruct"] >= 0 for b in blocks.values())
    if algorithm == "temporal":
        assert rep["algorithm_stats"]["temporal_block"]["n_layers"] > 0
        assert not any(k.startswith("time_embedding") for k in blocks)
    model, sched, r = load_quantized(str(out))
    calib, _ = capture_calibration(load_unet(r.model), sched, r.sampler, r.calibration, progress=False)
    assert noise_mse(model, calib.val)[0] == pytest.approx(rep["metrics"]["noise_mse"], rel=1e-5)


def test_attention_unit_with_all_linears_kept_reconstructs_its_matmul_quantizers(tiny_model_dir, tmp_path):
    from gaq_backend.algorithms.blocks import reconstruction_units

    model = __import__("gaq_backend.models", fromlist=["load_unet"]).load_unet(tiny_model_dir)
    wrap_unet(model, 4, 8, ["to_q", "to_k", "to_v", "to_out"])
    units = [u for u in reconstruction_units(model) if type(u.module).__name__ == "Attention"]
    assert units and all(not u.layers() and len(u.act_quantizers()) == 4 for u in units)


def test_the_network_phase_tunes_every_plain_step_size_from_the_reconstructed_model(tiny_model_dir, tmp_path):
    """settings.network_iters: after the units, the step sizes are tuned on the whole model against the FP noise
    prediction; it starts from exactly the model without the phase, lowers the training error, and leaves the
    temporal block's per-timestep tables as fitted."""
    import json, os
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.config import CalibrationConfig, SamplerConfig
    from gaq_backend.evaluation import noise_mse
    from gaq_backend.models import load_unet
    from gaq_backend.wrapping import quantizers

    sched = json.load(open(os.path.join(tiny_model_dir, "scheduler_config.json")))
    calib, _ = capture_calibration(load_unet(tiny_model_dir), sched, SamplerConfig(num_inference_steps=10),
                                   CalibrationConfig(n_per_step=4, interval=2, n_groups=2, val_fraction=0.25, cache_dir=str(tmp_path)), progress=False)
    models = [quantize(load_unet(tiny_model_dir), QuantConfig(w_bits=4, a_bits=8, keep_fp=[], algorithm=TemporalConfig(
        iters=4, act_iters=4, tib_iters=4, batch_size=8, network_iters=n)), calib, progress=False) for n in (0, 30)]
    base, tuned = models
    net = tuned.gaq_info.stats.network_phase
    assert base.gaq_info.stats.network_phase is None and "network_phase" in tuned.gaq_info.stats.to_dict()
    assert net["train_mse_before"] == pytest.approx(noise_mse(base, calib.train)[0], rel=1e-4)
    assert net["train_mse_after"] < net["train_mse_before"]
    assert sorted(net["per_timestep_ratio"]) == sorted(f"{float(t):g}" for t in calib.train.t.unique())
    plain = {n: (a, b) for (n, a), (_, b) in zip(quantizers(base, "act"), quantizers(tuned, "act")) if a.enabled}
    tables = {n for n, (a, _) in plain.items() if a.timestep_ranges is not None}
    assert tables and net["step_sizes"] == len(plain) - len(tables)
    assert all(torch.equal(a.timestep_ranges.scale, b.timestep_ranges.scale) for n, (a, b) in plain.items() if n in tables)
    assert sum(not torch.equal(a.scale, b.scale) for n, (a, b) in plain.items() if n not in tables) > len(plain) // 2
