"""Which ways of running an INT8 x INT4 convolution are fast on onnxruntime's CPU provider?

    python experiments/ort_conv_paths.py [--channels 64] [--size 32] [--batch 8] [--threads 1 2]

Six 3x3 convolutions (C -> C channels, SiLU between them, as in a UNet ResNet block) written five ways:

- ``float``: Conv with float weights (what the FP32 export runs);
- ``qdq``: Q/DQ on the input and DQ on INT8-held 4-bit weights, float output (what gaq exports: the
  calibrated model has no quantizer on the conv output);
- ``qdq+output-q``: the same plus a Q/DQ on the output, which onnxruntime fuses to QLinearConv (what
  ``quantize_static`` writes; an extra quantization the calibrated model does not have);
- ``convinteger``: QuantizeLinear -> ConvInteger -> Cast -> Mul (exact integer arithmetic, float output);
- ``im2col+matmul``: QuantizeLinear, NHWC, 9 Slices + Concat, MatMulIntegerToFloat (exact, float output).

Prints the median latency (ms) of 20 runs after 3 warm-up runs, per thread count, and each path's speed
relative to ``float``. Random weights; only the timing matters.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

LAYERS = 6


def _conv_layer(kind: str, i: int, cur: str, c: int, size: int, rng) -> tuple[list, list, str]:
    w = rng.integers(-8, 8, (c, c, 3, 3)).astype(np.int8)
    ws = (rng.random(c) * 0.01 + 0.01).astype(np.float32)
    a_scale, a_zero = numpy_helper.from_array(np.array(0.05, np.float32), f"as{i}"), numpy_helper.from_array(np.array(0, np.int8), f"az{i}")
    out = f"c{i}"
    if kind == "float":
        return [helper.make_node("Conv", [cur, f"w{i}"], [out], pads=[1, 1, 1, 1])], \
            [numpy_helper.from_array(w * ws[:, None, None, None], f"w{i}")], out
    if kind in ("qdq", "qdq+output-q"):
        inits = [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(ws, f"ws{i}"),
                 numpy_helper.from_array(np.zeros(c, np.int8), f"wz{i}"), a_scale, a_zero]
        nodes = [helper.make_node("QuantizeLinear", [cur, f"as{i}", f"az{i}"], [f"q{i}"]),
                 helper.make_node("DequantizeLinear", [f"q{i}", f"as{i}", f"az{i}"], [f"dq{i}"]),
                 helper.make_node("DequantizeLinear", [f"w{i}", f"ws{i}", f"wz{i}"], [f"dw{i}"], axis=0),
                 helper.make_node("Conv", [f"dq{i}", f"dw{i}"], [f"cc{i}" if kind != "qdq" else out], pads=[1, 1, 1, 1])]
        if kind == "qdq+output-q":
            inits.append(numpy_helper.from_array(np.array(0.1, np.float32), f"os{i}"))
            nodes += [helper.make_node("QuantizeLinear", [f"cc{i}", f"os{i}", f"az{i}"], [f"oq{i}"]),
                      helper.make_node("DequantizeLinear", [f"oq{i}", f"os{i}", f"az{i}"], [out])]
        return nodes, inits, out
    if kind == "convinteger":
        # uint8 activations with zero-point 128 hold the symmetric int8 grid exactly (ConvInteger's CPU kernel wants uint8)
        inits = [numpy_helper.from_array(w, f"w{i}"), a_scale, numpy_helper.from_array(np.array(128, np.uint8), f"au{i}"),
                 numpy_helper.from_array((ws * 0.05).reshape(1, c, 1, 1), f"os{i}")]
        nodes = [helper.make_node("QuantizeLinear", [cur, f"as{i}", f"au{i}"], [f"q{i}"]),
                 helper.make_node("ConvInteger", [f"q{i}", f"w{i}", f"au{i}"], [f"ci{i}"], pads=[1, 1, 1, 1]),
                 helper.make_node("Cast", [f"ci{i}"], [f"cf{i}"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", [f"cf{i}", f"os{i}"], [out])]
        return nodes, inits, out
    if kind == "im2col+matmul":
        wk = w.transpose(2, 3, 1, 0).reshape(9 * c, c)   # rows ordered (kh, kw, cin), as the patches below
        inits = [numpy_helper.from_array(wk, f"w{i}"), numpy_helper.from_array(ws, f"ws{i}"),
                 numpy_helper.from_array(np.zeros(c, np.int8), f"wz{i}"), a_scale, a_zero,
                 numpy_helper.from_array(np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64), f"pad{i}"),
                 numpy_helper.from_array(np.array([-1, 9 * c], np.int64), f"flat{i}"),
                 numpy_helper.from_array(np.array([-1, size, size, c], np.int64), f"unflat{i}"),
                 numpy_helper.from_array(np.array([1, 2], np.int64), f"axes{i}")]
        nodes = [helper.make_node("QuantizeLinear", [cur, f"as{i}", f"az{i}"], [f"q{i}"]),
                 helper.make_node("Transpose", [f"q{i}"], [f"qt{i}"], perm=[0, 2, 3, 1]),
                 helper.make_node("Pad", [f"qt{i}", f"pad{i}"], [f"qp{i}"])]
        parts = []
        for kh in range(3):
            for kw in range(3):
                lo, hi = numpy_helper.from_array(np.array([kh, kw], np.int64), f"lo{i}{kh}{kw}"), \
                    numpy_helper.from_array(np.array([kh + size, kw + size], np.int64), f"hi{i}{kh}{kw}")
                inits += [lo, hi]
                parts.append(f"s{i}{kh}{kw}")
                nodes.append(helper.make_node("Slice", [f"qp{i}", lo.name, hi.name, f"axes{i}"], [parts[-1]]))
        nodes += [helper.make_node("Concat", parts, [f"cat{i}"], axis=3),
                  helper.make_node("Reshape", [f"cat{i}", f"flat{i}"], [f"m{i}"]),
                  helper.make_node("MatMulIntegerToFloat", [f"m{i}", f"w{i}", f"as{i}", f"ws{i}", f"az{i}", f"wz{i}"],
                                   [f"mm{i}"], domain="com.microsoft"),
                  helper.make_node("Reshape", [f"mm{i}", f"unflat{i}"], [f"mo{i}"]),
                  helper.make_node("Transpose", [f"mo{i}"], [out], perm=[0, 3, 1, 2])]
        return nodes, inits, out
    raise ValueError(kind)


def build(kind: str, c: int, size: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, cur = [], [], "x"
    for i in range(LAYERS):
        n, t, out = _conv_layer(kind, i, cur, c, size, rng)
        nodes += n + [helper.make_node("Sigmoid", [out], [f"g{i}"]), helper.make_node("Mul", [out, f"g{i}"], [f"y{i}"])]
        inits += t
        cur = f"y{i}"
    shape = ["batch", c, size, size]
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    x = np.random.default_rng(1).standard_normal((args.batch, args.channels, args.size, args.size), dtype=np.float32)
    kinds = ["float", "qdq", "qdq+output-q", "convinteger", "im2col+matmul"]
    print(f"{LAYERS} convs {args.channels}->{args.channels}, {args.size}x{args.size}, batch {args.batch}, onnxruntime {ort.__version__}")
    print("| threads | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 1) + "|")
    for threads in args.threads:
        ms = {}
        for kind in kinds:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.log_severity_level = threads, 3
            sess = ort.InferenceSession(build(kind, args.channels, args.size).SerializeToString(), opts, providers=["CPUExecutionProvider"])
            for _ in range(3):
                sess.run(None, {"x": x})
            times = []
            for _ in range(20):
                t0 = time.perf_counter()
                sess.run(None, {"x": x})
                times.append((time.perf_counter() - t0) * 1000)
            ms[kind] = float(np.median(times))
        print(f"| {threads} | " + " | ".join(f"{ms[k]:.2f} ms ({ms['float'] / ms[k]:.2f}x)" for k in kinds) + " |")


if __name__ == "__main__":
    main()
