"""``gaq export --diagnose`` (exporters/parity_debug.py): names the first module where onnxruntime and PyTorch part."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import gaq_backend as gaq
from exporters.onnx_export import build_quantized_onnx
from exporters.parity_debug import diagnose, report, scope_of
from exporters.validate import held_out_inputs
from unet_zoo import build_unet, generate, quant_config, sampling_loop


@pytest.fixture(scope="module")
def exported():
    case = generate(19)
    q = gaq.quantize(build_unet(case), quant_config("minmax", 8, 8), forward_loop=sampling_loop(case, 0), progress=False)
    return q, build_quantized_onnx(q, "int8", 21, {}), held_out_inputs(q, 2)


def test_scope_keeps_list_indices_with_their_list():
    assert scope_of("down_blocks.0.resnets.1.conv1") == "/unet/down_blocks.0/resnets.1/conv1"
    assert scope_of("conv_in") == "/unet/conv_in"


def test_a_faithful_export_has_no_divergence(exported):
    q, model, inputs = exported
    first, rows = diagnose(model, q, *inputs)
    assert first is None and len(rows) > 50
    assert "no module drifts" in report(first, rows, 10.0)


def test_a_planted_weight_scale_error_is_named_where_it_starts(exported):
    q, model, inputs = exported
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    target = "up_blocks.0.resnets.1.conv1"
    node = next(n for n in bad.graph.node if n.op_type == "DequantizeLinear" and n.name.startswith(scope_of(target) + "/")
                and any(i.name == n.input[0] and i.dims and len(i.dims) == 4 for i in bad.graph.initializer))  # the weight's
    init = next(i for i in bad.graph.initializer if i.name == node.input[1])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.05), init.name))
    first, rows = diagnose(bad, q, *inputs)
    assert first is not None and first.name == target, report(first, rows, 10.0)
    assert f"first divergence: {target}" in report(first, rows, 10.0)


def test_cli_debug_prints_the_diagnosis_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    import os

    from conftest import quantize_tiny_folder
    from gaq_backend.cli import main

    q = quantize_tiny_folder(tmp_path, tiny_model_dir)["out"]
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(q))
    capsys.readouterr()
    assert main(["export", str(q), "--diagnose"]) == 0
    assert "parity diagnosis:" in capsys.readouterr().out
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(q))) == before
    assert main(["export", str(q)]) == 2
    assert "needs --out" in capsys.readouterr().err
