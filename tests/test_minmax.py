import json
import os

import pytest
import torch

from gaq_backend import MinMaxConfig, QuantConfig, quantize
from gaq_backend.calibration import capture_calibration
from gaq_backend.config import CalibrationConfig, ConfigError, SamplerConfig
from gaq_backend.evaluation import noise_mse
from gaq_backend.models import load_unet
from gaq_backend.quantizers.observers import MinMaxObserver
from gaq_backend.algorithms.common import observing_activations, run_calibration_batches, set_quant_state
from gaq_backend.wrapping import quant_layers, wrap_unet


@pytest.fixture(scope="module")
def calib(tiny_model_dir, tmp_path_factory):
    with open(os.path.join(tiny_model_dir, "scheduler_config.json")) as f:
        sched = json.load(f)
    cfg = CalibrationConfig(n_per_step=8, interval=2, n_groups=5, val_fraction=0.25, cache_dir=str(tmp_path_factory.mktemp("c")))
    return capture_calibration(load_unet(tiny_model_dir), sched, SamplerConfig(num_inference_steps=10), cfg, progress=False)[0]


def test_more_bits_means_less_noise_error(tiny_model_dir, calib):
    errs = {}
    for w, a in [(4, 8), (8, 8), (4, 32), (8, 32)]:
        m = quantize(load_unet(tiny_model_dir), QuantConfig(w_bits=w, a_bits=a, keep_fp=[], algorithm=MinMaxConfig()), calib, progress=False)
        errs[(w, a)] = noise_mse(m, calib.val)[0]
    assert errs[(8, 8)] < errs[(4, 8)] and errs[(8, 32)] < errs[(4, 32)]
    assert errs[(8, 32)] < errs[(8, 8)]
    assert all(e > 0 for e in errs.values())


def test_minmax_sets_activation_ranges_to_the_observed_fp_extremes(tiny_model_dir, calib):
    m = quantize(load_unet(tiny_model_dir), QuantConfig(w_bits=8, a_bits=8, act_symmetric=False, keep_fp=[], algorithm=MinMaxConfig()), calib, progress=False)
    ref = load_unet(tiny_model_dir)
    wrap_unet(ref, 8, 8, [], a_symmetric=False)
    set_quant_state(ref, weight=False, act=True)
    with observing_activations(ref, MinMaxObserver) as obs:
        run_calibration_batches(ref, calib.train, 64, "", False)
    q = dict(m.named_modules())
    for name, ob in obs.items():
        lo, hi = ob.range()
        quant = q[name]
        assert float(quant.scale) == pytest.approx(float(max(hi, 0) - min(lo, 0)) / 255, rel=1e-5)


def test_weights_are_round_to_nearest_on_a_per_channel_grid(tiny_model_dir, calib):
    fp = load_unet(tiny_model_dir)
    m = quantize(load_unet(tiny_model_dir), QuantConfig(w_bits=4, a_bits=32, keep_fp=[], algorithm=MinMaxConfig()), calib, progress=False)
    fp_mods = dict(fp.named_modules())
    for name, layer in quant_layers(m):
        w = fp_mods[name].weight
        assert layer.weight_int is not None and layer.weight_int.min() >= -8 and layer.weight_int.max() <= 7
        for part_w, part_i, q in zip(layer.input_parts(w) if layer.split else [w],
                                     layer.input_parts(layer.weight_int) if layer.split else [layer.weight_int], layer.weight_quantizers):
            assert torch.equal(part_i, torch.clamp(torch.round(part_w / q.scale), -8, 7))


def test_quantize_requires_an_algorithm(tiny_model_dir, calib):
    with pytest.raises(ConfigError, match="algorithm is not set"):
        quantize(load_unet(tiny_model_dir), QuantConfig(), calib)


def test_nan_calibration_data_is_refused_before_touching_the_model(tiny_model_dir, calib):
    bad = calib.subset(torch.arange(len(calib)))
    bad.eps[0, 0, 0, 0] = float("inf")
    model = load_unet(tiny_model_dir)
    with pytest.raises(ValueError, match="NaN or Inf in 'eps'"):
        quantize(model, QuantConfig(algorithm=MinMaxConfig()), bad)
    assert not quant_layers(model)


def test_a_registered_third_party_algorithm_runs_and_its_figures_reach_the_record(tiny_model_dir, calib, monkeypatch):
    from dataclasses import dataclass
    from typing import ClassVar

    import gaq_backend.algorithms.registry as registry
    from gaq_backend.algorithms.minmax import calibrate_minmax
    from gaq_backend.config import AlgorithmConfig

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # leaves no trace in other tests

    @dataclass
    class MineConfig(AlgorithmConfig):
        name: ClassVar[str] = "mine"
        weight_range: str = "max"
        act_range: str = "minmax"
        percentile: float = 99.99
        batch_size: int = 64

    @registry.register_algorithm(MineConfig)
    def calibrate_mine(model, config, calibration, fp_model=None, progress=True):
        calibrate_minmax(model, config, calibration, fp_model, progress)
        return {"rows": len(calibration.train)}

    q = quantize(load_unet(tiny_model_dir), QuantConfig(w_bits=8, a_bits=8, algorithm=MineConfig()), calib, progress=False)
    assert q.gaq_info.stats.extra == {"rows": len(calib.train)}
    assert json.loads(json.dumps(q.gaq_info.stats.to_dict())) == {"rows": len(calib.train)}
