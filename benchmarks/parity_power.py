"""How much can the export parity bound see? docs/benchmarks.md section 10, "the one refusal".

    python benchmarks/parity_power.py

On generated UNets (tests/unet_zoo.py, calibrated as the zoo benchmark does, one torch thread), in mean output
INT8 steps: onnxruntime vs PyTorch float32 on the faithful graph, PyTorch float64 vs float32 (what the bound
scales with), PyTorch float32 with its inputs perturbed by 1e-6 relative noise (how far float-level
differences carry on this model), and onnxruntime on the same graph with one conv's weight scale 5% off (a
small real defect), against the bound.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

CASES = [(61, "uniform", 4, "int4"), (19, "minmax", 8, "int8"), (0, "minmax", 8, "int8")]


def main() -> int:
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    import gaq_backend as gaq
    from exporters.onnx_export import build_quantized_onnx
    from exporters.validate import _run_torch, compare_with_torch, held_out_inputs
    from unet_zoo import CALIBRATION_SEEDS, build_unet, generate, quant_config, sampling_loop

    torch.set_num_threads(1)
    print("| seed | config | onnxruntime vs torch | float64 vs float32 | 1e-6 input noise | 5% scale defect | bound |")
    print("|---|---|---|---|---|---|---|")
    for seed, algorithm, w, form in CASES:
        case = generate(seed)
        loops = [sampling_loop(case, s) for s in CALIBRATION_SEEDS]
        q = gaq.quantize(build_unet(case), quant_config(algorithm, w, 8), forward_loop=lambda u: [f(u) for f in loops], progress=False)
        model = build_quantized_onnx(q, form, 21, {})
        x, t, cond = held_out_inputs(q, 64)
        ok = compare_with_torch(model, q, x, t, cond)
        ref, step = ok["reference"][0], ok["output_step"]
        noisy = x * (1 + 1e-6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
        noise = float(np.abs(_run_torch(q, noisy, t, cond, 64) - ref).mean() / step)
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        weight_dq = [n for n in bad.graph.node if n.op_type == "DequantizeLinear" and "/conv" in n.name
                     and any(i.name == n.input[0] and len(i.dims) == 4 for i in bad.graph.initializer)]
        node = weight_dq[len(bad.graph.node) % len(weight_dq)]
        scale = next(i for i in bad.graph.initializer if i.name == node.input[1])
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.05), scale.name))
        wrong = compare_with_torch(bad, q, x, t, cond)
        print(f"| {seed} | {algorithm} W{w}A8 {form} | {ok['mean_steps']:.3f} | {ok['float64_vs_float32']['mean_steps']:.3f} | "
              f"{noise:.3f} | {wrong['mean_steps']:.3f} ({node.name.rsplit('/', 1)[0]}) | {ok['bounds']['mean_steps']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
