import json
import os

import pytest
import torch

from gaq_backend.calibration import capture_calibration
from gaq_backend.calibration.calibration_set import split_and_group
from gaq_backend.config import CalibrationConfig, SamplerConfig
from gaq_backend.models import load_unet


def _sched(model_dir):
    with open(os.path.join(model_dir, "scheduler_config.json")) as f:
        return json.load(f)


def test_split_is_balanced_per_step_and_groups_are_consecutive_runs():
    steps = torch.arange(10).repeat_interleave(40)
    t = (990 - steps * 100)  # step 0 is the noisiest
    is_val, group = split_and_group(steps, t, 0.05, 5, seed=3)
    for s in range(10):
        assert int(is_val[steps == s].sum()) == 2
    # groups ordered by increasing t, each a run of 2 consecutive steps
    for g in range(5):
        assert sorted(set(steps[group == g].tolist())) == [9 - 2 * g - 1, 9 - 2 * g]
    is_val2, _ = split_and_group(steps, t, 0.05, 5, seed=3)
    assert torch.equal(is_val, is_val2)


def test_uneven_groups_differ_by_at_most_one_step():
    steps = torch.arange(7).repeat_interleave(4)
    _, group = split_and_group(steps, 1000 - steps, 0.25, 3, seed=0)
    sizes = [len(set(steps[group == g].tolist())) for g in range(3)]
    assert sorted(sizes) == [2, 2, 3]


def test_too_many_groups_or_too_few_samples_is_refused():
    steps = torch.arange(3).repeat_interleave(2)
    with pytest.raises(ValueError, match="n_groups=5 exceeds the 3 recorded steps"):
        split_and_group(steps, steps, 0.1, 5, 0)
    with pytest.raises(ValueError, match="too few"):
        split_and_group(torch.zeros(1, dtype=torch.long), torch.zeros(1), 0.1, 1, 0)


def test_capture_records_every_interval_step_and_reuses_cache(tiny_model_dir, tmp_path):
    unet = load_unet(tiny_model_dir)
    sampler = SamplerConfig(num_inference_steps=10)
    cfg = CalibrationConfig(n_per_step=6, interval=3, n_groups=2, val_fraction=0.2, cache_dir=str(tmp_path))
    calib, cached = capture_calibration(unet, _sched(tiny_model_dir), sampler, cfg, progress=False)
    assert not cached and len(calib) == 6 * 4  # steps 0, 3, 6, 9
    assert sorted(set(calib.step.tolist())) == [0, 1, 2, 3]
    assert calib.t.unique().numel() == 4 and int(calib.is_val.sum()) == 4
    # the recorded eps is the FP model's output on the recorded input
    with torch.no_grad():
        assert torch.allclose(unet(calib.x[:3], calib.t[:3]).sample, calib.eps[:3], atol=1e-5)
    again, cached = capture_calibration(unet, _sched(tiny_model_dir), sampler, cfg, progress=False)
    assert cached and torch.equal(again.x, calib.x)
    assert len(list(tmp_path.glob("calib-*.safetensors"))) == 1
    # a different setting or different weights is a cache miss
    _, cached = capture_calibration(unet, _sched(tiny_model_dir), sampler, CalibrationConfig(**{**cfg.to_dict(), "seed": 1}), progress=False)
    assert not cached
    with torch.no_grad():
        unet.conv_in.weight.add_(0.01)
    _, cached = capture_calibration(unet, _sched(tiny_model_dir), sampler, cfg, progress=False)
    assert not cached and len(list(tmp_path.glob("calib-*.safetensors"))) == 3


def test_nan_in_calibration_data_is_reported(tiny_model_dir, tmp_path):
    unet = load_unet(tiny_model_dir)
    cfg = CalibrationConfig(n_per_step=4, interval=5, n_groups=2, val_fraction=0.25, cache_dir=str(tmp_path))
    calib, _ = capture_calibration(unet, _sched(tiny_model_dir), SamplerConfig(num_inference_steps=10), cfg, progress=False)
    calib.x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf in 'x'"):
        calib.check_finite()
