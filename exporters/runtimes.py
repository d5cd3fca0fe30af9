"""One door to the runtimes gaq deploys to: onnxruntime (cpu, cuda, tensorrt providers) and OpenVINO
(cpu, gpu devices). Both sessions answer ``run``, ``get_inputs`` and ``get_providers`` the same way."""
from __future__ import annotations

RUNTIMES = ("onnxruntime", "openvino")


def open_session(model, runtime: str = "onnxruntime", provider: str = "cpu", threads: int = 0, precision: str = "default",
                 config: dict[str, str] | None = None):
    """A session of ``model`` (path or ModelProto) on ``runtime``; ``provider`` is onnxruntime's provider or
    OpenVINO's device, ``precision`` OpenVINO's inference precision hint (``f32`` for parity checks)."""
    if runtime == "onnxruntime":
        from .ort_runtime import create_session

        return create_session(model, provider, threads, config)
    if runtime == "openvino":
        from .openvino_runtime import OpenVINOSession

        return OpenVINOSession(model, provider, threads, precision)
    raise ValueError(f"runtime {runtime!r} (allowed: {', '.join(RUNTIMES)})")
