"""One copy of the model (issue 14): the FP targets come from the same module in full precision."""
import copy

import pytest
import torch

import gaq_backend as gaq
from gaq_backend.algorithms.common import full_precision
from gaq_backend.algorithms.gradient_aligned import GradientAlignedConfig
from gaq_backend.algorithms.temporal import TemporalConfig
from gaq_backend.algorithms.uniform import UniformConfig
from gaq_backend.sampling import unet_forward


@pytest.mark.parametrize("algorithm", [UniformConfig(iters=4, act_iters=4, batch_size=8),
                                       TemporalConfig(iters=4, act_iters=4, tib_iters=4, batch_size=8),
                                       GradientAlignedConfig(iters=4, act_iters=4, outer_iters=2, outer_batch_size=8,
                                                             batch_size=8, diagnostics=False)])
def test_no_copy_of_the_model_and_full_precision_is_the_fp_model(algorithm, monkeypatch):
    from test_front_doors import _config, sampling_loop, sd_unet

    reference = sd_unet()   # the same weights, never wrapped
    unet = sd_unet()
    import gaq_backend.api as api

    def no_copy(*a, **k):
        raise AssertionError("the quantize path deep-copied the model")
    monkeypatch.setattr(api.copy, "deepcopy", no_copy)
    q = gaq.quantize(unet, _config(algorithm, "W4A8"), forward_loop=sampling_loop("sd"), progress=False)
    monkeypatch.undo()
    held = q.gaq_info.held_out
    with torch.no_grad():
        quantized = unet_forward(q, held.x, held.t, held.cond)
        with full_precision(q):
            # before the final freeze, full precision is the FP model bit for bit; after it, the float weights
            # hold the rounded integers, so only the quantizers' state and processors are restored
            fp_after = unet_forward(q, held.x, held.t, held.cond)
        expected = unet_forward(reference, held.x, held.t, held.cond)
    assert torch.equal(unet_forward(q, held.x, held.t, held.cond), quantized)  # state restored on exit
    assert not torch.equal(fp_after, expected)  # frozen: the float weights are the quantized ones now


def test_full_precision_during_calibration_reproduces_the_unwrapped_model(tiny_model_dir):
    from gaq_backend.api import wrap_for_config
    from gaq_backend.models import load_unet

    fp, model = load_unet(tiny_model_dir), load_unet(tiny_model_dir)
    cfg = gaq.QuantConfig(w_bits=4, a_bits=8, keep_fp=["conv_in", "conv_out"], algorithm=gaq.MinMaxConfig())
    wrap_for_config(model, cfg)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([900, 500, 20])
    with torch.no_grad(), full_precision(model):
        assert torch.equal(unet_forward(model, x, t), unet_forward(fp, x, t))
