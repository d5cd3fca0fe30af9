"""OpenVINO sessions for gaq's ONNX files, shaped like onnxruntime's (``run``, ``get_inputs``, ``get_providers``).

OpenVINO reads the Q/DQ graphs directly and runs the ``--weights int8`` form with INT8 convolution and
matmul kernels on CPUs with VNNI / AMX, which onnxruntime's CPU provider does not do for these graphs
(docs/benchmarks.md). Two traps: on CPUs with bf16 units OpenVINO's default inference precision is bf16,
so an FP32 baseline must ask for ``INFERENCE_PRECISION_HINT=f32`` (``precision="f32"``), and the default is
its own row; and which kernels really ran is only known from the compiled model, which
:meth:`OpenVINOSession.executed_precisions` reports per layer type.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

DEVICES = {"cpu": "CPU", "gpu": "GPU"}
PRECISIONS = ("default", "f32", "bf16", "f16")
_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "i64": "tensor(int64)", "i32": "tensor(int32)"}


class OpenVINOUnavailable(RuntimeError):
    pass


@dataclass
class _Input:  # the fields of onnxruntime's NodeArg that gaq reads
    name: str
    type: str
    shape: list


class OpenVINOSession:
    """A compiled OpenVINO model of an ONNX file. ``static`` fixes input shapes (e.g. ``{"sample": [8, 1, 32, 32]}``),
    which OpenVINO compiles faster kernels for; without it the batch and image size stay dynamic."""

    def __init__(self, model, device: str = "cpu", threads: int = 0, precision: str = "default",
                 static: dict[str, list[int]] | None = None) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise OpenVINOUnavailable("OpenVINO is not installed (pip install 'gaq[openvino]')") from None
        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision {precision!r} (allowed: {', '.join(PRECISIONS)})")
        core = ov.Core()
        self.device = DEVICES.get(device, device.upper())
        if self.device not in core.available_devices:
            raise OpenVINOUnavailable(f"OpenVINO device {self.device} is not available here (available: {', '.join(core.available_devices)})")
        m = core.read_model(model) if isinstance(model, str) else core.read_model(model.SerializeToString(), b"")
        if static:
            m.reshape(static)
        config: dict = {}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        if precision != "default":
            config["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = core.compile_model(m, self.device, config)
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # e.g. f32, bf16
        self.request = self.compiled.create_infer_request()
        self._inputs = [_Input(p.get_any_name(), _TYPES.get(p.get_element_type().get_type_name(), "tensor(float)"),
                               [d.get_length() if d.is_static else None for d in p.get_partial_shape()])
                        for p in self.compiled.inputs]

    def get_inputs(self) -> list[_Input]:
        return self._inputs

    def get_providers(self) -> list[str]:
        """What ran, in the words a report uses: the device and the inference precision it really used."""
        return [f"OpenVINO {self.device} {self.precision}"]

    def run(self, output_names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feed)
        return [np.asarray(result[out]) for out in self.compiled.outputs]

    def executed_precisions(self) -> dict[str, dict[str, int]]:
        """Layer type -> {runtime precision: count} of the compiled graph (Convolution in i8 means INT8 kernels ran)."""
        counts: Counter = Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str)
            if kind in ("Parameter", "Result", "Const", "Input", "Output"):
                continue
            counts[(kind, info["runtimePrecision"].astype(str))] += 1
        table: dict[str, dict[str, int]] = {}
        for (kind, prec), n in sorted(counts.items()):
            table.setdefault(kind, {})[prec] = n
        return table


def int8_share(executed: dict[str, dict[str, int]]) -> str:
    """``Convolution 45/47, FullyConnected 29/29 ...``: how many of the compute layers ran INT8 kernels."""
    parts = []
    for kind in ("Convolution", "FullyConnected", "MatMul"):
        counts = executed.get(kind, {})
        if counts:
            parts.append(f"{kind} {counts.get('i8', 0) + counts.get('u8', 0)}/{sum(counts.values())}")
    return ", ".join(parts) or "-"
