"""Everything follows the model's device (issue 14, first part). Without a GPU here, the guard is the one
the issue names: the flows run with the model on the CPU while torch's default device is "meta", so any
tensor gaq creates without an explicit device becomes a meta tensor and the flow fails."""
import contextlib

import pytest
import torch

import gaq_backend as gaq
from gaq_backend.algorithms.gradient_aligned import GradientAlignedConfig
from gaq_backend.algorithms.temporal import TemporalConfig
from gaq_backend.algorithms.uniform import UniformConfig


@contextlib.contextmanager
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _adam_follows_the_parameter() -> bool:
    """Older torch (2.11 seen) makes Adam's step counter on the default device, which this guard cannot tell
    from a gaq tensor; the optimizer-based algorithms are then checked on torch versions that do not."""
    p = torch.nn.Parameter(torch.zeros(1, device="cpu"))
    p.grad = torch.zeros(1, device="cpu")
    opt = torch.optim.Adam([p])
    try:
        with default_device_meta():
            opt.step()
    except RuntimeError:
        return False
    return opt.state[p]["step"].device.type == "cpu"


def _recorded_calls():
    from test_front_doors import sampling_loop, sd_unet

    calls, unet = [], sd_unet()
    unet.register_forward_pre_hook(lambda m, a, kw: calls.append({"sample": a[0], "timestep": a[1], **kw}), with_kwargs=True)
    sampling_loop("sd")(unet)
    return calls


@pytest.mark.parametrize("algorithm", [gaq.MinMaxConfig(), UniformConfig(iters=3, act_iters=3, batch_size=8),
                                       TemporalConfig(iters=3, act_iters=3, tib_iters=3, batch_size=8),
                                       GradientAlignedConfig(iters=3, act_iters=3, outer_iters=2, outer_batch_size=8, batch_size=8,
                                                             diagnostics=True, diagnostic_samples=8)])
def test_calibration_creates_no_tensor_off_the_models_device(algorithm, tmp_path):
    from test_front_doors import _config, sd_unet

    if not isinstance(algorithm, gaq.MinMaxConfig) and not _adam_follows_the_parameter():
        pytest.skip(f"torch {torch.__version__}'s Adam creates its step counter on the default device")
    calls, unet = _recorded_calls(), sd_unet()
    with default_device_meta():
        q = gaq.quantize(unet, _config(algorithm, "W4A8"), calibration=calls, progress=False)
    assert all(p.device.type == "cpu" for p in q.parameters()) and all(b.device.type == "cpu" for b in q.buffers())


def test_capture_sampling_save_and_load_create_no_tensor_off_the_models_device(tiny_model_dir, tmp_path):
    from gaq_backend.calibration import capture_calibration
    from gaq_backend.config import CalibrationConfig, SamplerConfig
    from gaq_backend.models.loading import load_model
    from gaq_backend.sampling import ddim_sample, initial_noise

    loaded = load_model(tiny_model_dir)
    cal = CalibrationConfig(n_per_step=4, interval=1, n_groups=2, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    sampler = SamplerConfig(num_inference_steps=4)
    with default_device_meta():
        calib, _ = capture_calibration(loaded.unet, loaded.scheduler_config, sampler, cal, progress=False)
        q = gaq.quantize(loaded.unet, gaq.preset("W4A8", algorithm=gaq.MinMaxConfig(), keep_fp=["conv_in", "conv_out"]), calib,
                         progress=False)
        images = ddim_sample(q, loaded.scheduler_config, sampler, initial_noise(2, (1, 16, 16), 0), progress=False)
        gaq.save_quantized(q, str(tmp_path / "q"))
        reloaded, _, _ = gaq.load_quantized(str(tmp_path / "q"))
    assert images.device.type == "cpu" and reloaded.conv_in.weight.device.type == "cpu"


def test_cli_device_flag(write_recipe, tmp_path):
    import json

    from gaq_backend.cli import main

    recipe = write_recipe()
    assert main(["quantize", recipe, "--out", str(tmp_path / "o"), "--quiet", "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["environment"]["device"] == "cpu"
    for bad in ("nonsense", "mps") + (() if torch.cuda.is_available() else ("cuda",)):
        assert main(["quantize", recipe, "--out", str(tmp_path / "o2"), "--quiet", "--device", bad]) == 2
    assert not (tmp_path / "o2").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cli_quantizes_on_cuda(write_recipe, tmp_path):
    from gaq_backend.cli import main

    recipe = write_recipe(algorithm="uniform", settings=dict(iters=4, act_iters=4, batch_size=8))
    assert main(["quantize", recipe, "--out", str(tmp_path / "o"), "--quiet", "--device", "cuda"]) == 0
    loaded, _, _ = gaq.load_quantized(str(tmp_path / "o"))
    assert loaded.conv_in.weight.device.type == "cpu"  # reloads build on the host
