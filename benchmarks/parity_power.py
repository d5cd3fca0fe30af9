"""How much can the export parity bound see?
Reproduces: docs/benchmarks.md, "Generated UNets: W8A8 fidelity and export parity".

    python benchmarks/parity_power.py                      # the table of three cases
    python benchmarks/parity_power.py --seeds 0:80 > runs/power.jsonl   # the layer check over the zoo: false alarms and power
    python benchmarks/parity_power.py --summary runs/power.jsonl        # the figures docs/benchmarks.md shows
    python benchmarks/parity_power.py --diagnose 0:12     # gaq export --diagnose on 3 planted convs per zoo seed

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

import argparse
import json

CASES = [(61, "uniform", 4, "int4"), (19, "minmax", 8, "int8"), (0, "minmax", 8, "int8")]


def plant_scale_defect(model, which: int, factor: float = 1.05):
    """A copy of ``model`` with one conv weight's DequantizeLinear scale multiplied by ``factor``; (copy, module scope)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    weight_dq = [n for n in bad.graph.node if n.op_type == "DequantizeLinear" and "/conv" in n.name
                 and any(i.name == n.input[0] and len(i.dims) == 4 for i in bad.graph.initializer)]
    node = weight_dq[which % len(weight_dq)]
    scale = next(i for i in bad.graph.initializer if i.name == node.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(factor), scale.name))
    return bad, node.name.rsplit("/", 1)[0]


def zoo_seeds(seeds: range) -> int:
    """Per (seed, config): the output bound and the per-layer check on the faithful graph and on a planted defect."""
    import torch

    import gaq_backend as gaq
    from exporters.onnx_export import build_quantized_onnx
    from exporters.parity_debug import LAYER_TOL, layer_check
    from exporters.parity_reference import held_out_inputs
    from exporters.validate import _over, compare_with_torch
    from unet_zoo import CALIBRATION_SEEDS, build_unet, configs_for, generate, quant_config, sampling_loop

    torch.set_num_threads(1)
    for seed in seeds:
        case = generate(seed)
        loops = [sampling_loop(case, s) for s in CALIBRATION_SEEDS]
        for algorithm, w, a, form in configs_for(seed):
            q = gaq.quantize(build_unet(case), quant_config(algorithm, w, a), forward_loop=lambda u: [f(u) for f in loops], progress=False)
            model = build_quantized_onnx(q, form, 21, {})
            x, t, cond = held_out_inputs(q, 64)
            ok = compare_with_torch(model, q, x, t, cond)
            layers = layer_check(model, q, x, t, cond)
            bad, scope = plant_scale_defect(model, seed)
            wrong = compare_with_torch(bad, q, x, t, cond, reference=ok["reference"])
            over = [r.name for r in layer_check(bad, q, x, t, cond) if r.rel_diff > LAYER_TOL]
            print(json.dumps(dict(seed=seed, family=case.family, config=f"{algorithm} W{w}A{a} {form}",
                                  output_ok=not _over(ok), output_mean_steps=ok["mean_steps"], layers=len(layers),
                                  layer_max_rel=max(r.rel_diff for r in layers), defect=scope,
                                  defect_output_caught=bool(_over(wrong)), defect_layers_over=over)), flush=True)
    return 0


def diagnose_seeds(seeds: range) -> int:
    """Per seed (W8A8 minmax, int8): the first divergence ``gaq export --diagnose`` names on the faithful graph and
    with a 5% weight-scale error planted in each of three convs (a third, half and five sixths of the way down)."""
    import torch

    import gaq_backend as gaq
    from exporters.onnx_export import build_quantized_onnx
    from exporters.parity_debug import diagnose, scope_of
    from exporters.parity_reference import held_out_inputs
    from unet_zoo import build_unet, generate, quant_config, sampling_loop

    torch.set_num_threads(1)
    named = total = 0
    for seed in seeds:
        case = generate(seed)
        q = gaq.quantize(build_unet(case), quant_config("minmax", 8, 8), forward_loop=sampling_loop(case, 0), progress=False)
        model, inputs = build_quantized_onnx(q, "int8", 21, {}), held_out_inputs(q, 2)
        faithful, _ = diagnose(model, q, *inputs)
        n_convs = sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and "/conv" in n.name
                      and any(i.name == n.input[0] and len(i.dims) == 4 for i in model.graph.initializer))
        for which in (n_convs // 3, n_convs // 2, 5 * n_convs // 6):
            bad, scope = plant_scale_defect(model, which)
            first, rows = diagnose(bad, q, *inputs)
            at = next(r for r in rows if scope_of(r.name) == scope)
            named += first is not None and scope_of(first.name) == scope
            total += 1
            print(json.dumps(dict(seed=seed, family=case.family, faithful_first=faithful and faithful.name, defect=scope,
                                  named=first and first.name, drift_at_defect=at.drift, floor_at_defect=at.float_noise)), flush=True)
    print(f"named the planted conv in {named} of {total}", flush=True)
    return 0


def main() -> int:
    import numpy as np
    import torch

    import gaq_backend as gaq
    from exporters.onnx_export import build_quantized_onnx
    from exporters.parity_reference import held_out_inputs, torch_outputs
    from exporters.validate import compare_with_torch
    from unet_zoo import CALIBRATION_SEEDS, build_unet, generate, quant_config, sampling_loop

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", help="a:b: run the zoo seeds a..b-1 instead of the table (JSON lines on stdout)")
    ap.add_argument("--summary", help="the figures of a --seeds run's JSON lines")
    ap.add_argument("--diagnose", help="a:b: gaq export --diagnose on planted defects over zoo seeds a..b-1 (JSON lines)")
    args = ap.parse_args()
    if args.diagnose:
        a, b = (int(v) for v in args.diagnose.split(":"))
        return diagnose_seeds(range(a, b))
    if args.summary:
        with open(args.summary, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        named = sum(r["defect_layers_over"] == [r["defect"].split("/", 2)[2].replace("/", ".")] for r in rows)
        print(f"{len(rows)} configs (seeds {rows[0]['seed']}-{rows[-1]['seed']}); faithful: output bound refused "
              f"{sum(not r['output_ok'] for r in rows)}, largest layer difference {max(r['layer_max_rel'] for r in rows):.1e}; "
              f"5% scale error: output bound caught {sum(r['defect_output_caught'] for r in rows)}, layer check "
              f"{sum(bool(r['defect_layers_over']) for r in rows)} ({named} naming only that conv)")
        return 0
    if args.seeds:
        a, b = (int(v) for v in args.seeds.split(":"))
        return zoo_seeds(range(a, b))
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
        noise = float(np.abs(torch_outputs(q, noisy, t, cond, 64) - ref).mean() / step)
        bad, scope = plant_scale_defect(model, len(model.graph.node))
        wrong = compare_with_torch(bad, q, x, t, cond)
        print(f"| {seed} | {algorithm} W{w}A8 {form} | {ok['mean_steps']:.3f} | {ok['float64_vs_float32']['mean_steps']:.3f} | "
              f"{noise:.3f} | {wrong['mean_steps']:.3f} ({scope}) | {ok['bounds']['mean_steps']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
