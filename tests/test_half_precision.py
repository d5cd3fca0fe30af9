"""Half-precision UNets (issue 14, first part): fp16 and bf16 models quantize on the CPU, keep their dtype,
reload exactly and export (as float32 graphs with the same integers and scales)."""
import pytest
import torch

import gaq_backend as gaq
from gaq_backend.algorithms.uniform import UniformConfig
from gaq_backend.sampling import unet_forward


def _calls(dtype, n_steps=5):
    from test_front_doors import COND_DIM, SEQ

    g = torch.Generator().manual_seed(0)
    return [dict(sample=torch.randn(4, 4, 8, 8, generator=g).to(dtype), timestep=torch.tensor(t),
                 encoder_hidden_states=torch.randn(4, SEQ, COND_DIM, generator=g).to(dtype))
            for t in torch.linspace(950, 50, n_steps).round().long().tolist()]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("dtype,device", [(torch.bfloat16, "cpu"), (torch.float16, "cpu"),
                                          pytest.param(torch.float16, "cuda", marks=CUDA), pytest.param(torch.bfloat16, "cuda", marks=CUDA)])
@pytest.mark.parametrize("algorithm", [gaq.MinMaxConfig(), UniformConfig(iters=4, act_iters=4, batch_size=8)])
def test_half_precision_unet_quantizes_keeps_its_dtype_reloads_and_exports(dtype, device, algorithm, tmp_path):
    from exporters.onnx_export import export_quantized
    from test_front_doors import _config, sd_unet

    calls = [{k: v.to(device) for k, v in c.items()} for c in _calls(dtype)]
    q = gaq.quantize(sd_unet().to(device, dtype), _config(algorithm, "W8A8"), calibration=calls, progress=False)
    held = q.gaq_info.held_out
    with torch.no_grad():
        y = unet_forward(q, held.x, held.t, held.cond)
    assert y.dtype == dtype and held.x.dtype == dtype and y.device.type == device
    assert q.down_blocks[0].resnets[0].conv1.weight_quantizers[0].scale.dtype == torch.float32  # scales stay float32
    err = (y.float().cpu() - held.eps.float()).pow(2).mean() / held.eps.float().pow(2).mean()
    assert err < 0.05, float(err)  # W8A8 stays close to FP
    gaq.save_quantized(q, str(tmp_path / "q"))
    loaded, _, _ = gaq.load_quantized(str(tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(unet_forward(loaded.to(device), held.x, held.t, held.cond), y)
    res = export_quantized(str(tmp_path / "q"), str(tmp_path / "m.onnx"), "int8", check_samples=8, progress=False)
    assert res.parity["n_inputs"] == min(8, len(held))


def test_cli_quantizes_a_unet_folder_in_bfloat16(tmp_path, tiny_model_dir):
    import json

    import yaml
    from conftest import tiny_recipe
    from gaq_backend.cli import main

    reports = {}
    for dtype in ("float32", "bfloat16"):
        recipe = tiny_recipe(tiny_model_dir, str(tmp_path / "cache"), model=dict(path=tiny_model_dir, dtype=dtype),
                             quantization=dict(w_bits=8, a_bits=8))
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["quantize", str(tmp_path / "r.yaml"), "--out", str(tmp_path / dtype), "--quiet"]) == 0
        reports[dtype] = json.loads((tmp_path / dtype / "report.json").read_text())["metrics"]
    loaded, _, r = gaq.load_quantized(str(tmp_path / "bfloat16"))
    assert loaded.conv_in.weight.dtype == torch.bfloat16 and r.model_options.dtype == "bfloat16"
    # bf16 W8A8 stays as close to its FP model as the float32 run does to its own (this random tiny model's
    # 10-step samples drift far from FP at any precision)
    for key in ("noise_mse", "sample_mse_vs_fp"):
        assert reports["bfloat16"][key] < 2 * reports["float32"][key] + 1e-3, (key, reports)
