"""The per-layer sensitivity report (gaq_backend/evaluation/sensitivity.py) on a generated UNet whose
W8A8 error one layer carries with one activation range for all timesteps (zoo seed 19: the downsampler
conv, whose input range spans the diverging trajectory's timesteps; minmax's default per-timestep ranges
fix it, so the test asks for global ranges)."""
import pytest
import torch

import gaq_backend as gaq
from unet_zoo import build_unet, generate, held_out_calls, quant_config, relative_error, sampling_loop


def global_ranges():
    config = quant_config("minmax", 8, 8)
    config.algorithm = gaq.MinMaxConfig(timestep_ranges="global")
    return config


@pytest.fixture(scope="module")
def seed19():
    case = generate(19)
    unet = build_unet(case)
    fp = gaq.float_weights(unet)
    q = gaq.quantize(unet, global_ranges(), forward_loop=sampling_loop(case, 0), progress=False)
    return case, q, fp


def test_report_names_the_layer_and_its_keep_fp_suggestion_holds_when_requantized(seed19):
    case, q, fp = seed19
    calls = held_out_calls(case, build_unet(case))
    before = relative_error(q, calls)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    rep = gaq.layer_sensitivity(q, fp, target=0.01, progress=False)
    # measuring leaves the model as it was
    assert relative_error(q, calls) == before
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())
    top = rep.layers[0]
    assert top.name == "down_blocks.0.downsamplers.0.conv" and top.share > 0.9 and top.act_alone > 10 * top.weight_alone
    assert rep.error > 0.02 and rep.reached and rep.suggested_keep_fp == [top.name]
    assert rep.error_with_suggestion == pytest.approx(top.all_but)
    assert "keep_fp suggestion" in rep.table()
    # the suggestion, given to quantize, gives that error on calls the report never saw
    config = global_ranges()
    config.keep_fp = config.keep_fp + rep.suggested_keep_fp
    q2 = gaq.quantize(build_unet(case), config, forward_loop=sampling_loop(case, 0), progress=False)
    assert relative_error(q2, calls) < 0.01


def test_fp_weights_must_belong_to_the_model(seed19):
    _, q, fp = seed19
    wrong = dict(fp)
    wrong.pop("down_blocks.0.downsamplers.0.conv")
    with pytest.raises(ValueError, match="FP weights do not match the quantized model at down_blocks.0.downsamplers.0.conv"):
        gaq.layer_sensitivity(q, wrong, progress=False)
