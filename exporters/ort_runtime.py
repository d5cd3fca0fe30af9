"""onnxruntime sessions for gaq's ONNX files (no torch import: the deploy path uses this).

``session.qdq_matmulnbits_accuracy_level = 0``: onnxruntime rewrites a weight-only ``DQ -> MatMul`` into
MatMulNBits and, at its default accuracy level 4, quantizes that MatMul's float input to int8 on the
fly. For a W4A32 graph that is a quantization the calibrated model does not have (measured: 0.015
output INT8 steps mean error, against 2e-7 at level 0), so gaq's sessions ask for float accuracy.
"""
from __future__ import annotations

import os

import numpy as np

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class ProviderUnavailable(RuntimeError):
    pass


def create_session(model, provider: str = "cpu", threads: int = 0, config: dict[str, str] | None = None,
                   provider_options: dict[str, str] | None = None):
    """A session on ``provider`` (cpu | cuda | tensorrt); raises :class:`ProviderUnavailable` if onnxruntime
    would silently run it on another provider. ``config``: extra session config entries; ``provider_options``:
    the provider's own (e.g. TensorRT's ``trt_fp16_enable``)."""
    import onnxruntime as ort

    name = PROVIDERS.get(provider, provider)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in {"session.qdq_matmulnbits_accuracy_level": "0", **(config or {})}.items():
        opts.add_session_config_entry(key, value)
    if threads:
        opts.intra_op_num_threads = threads
    src = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    first = (name, provider_options) if provider_options else name
    providers = [first] if name == "CPUExecutionProvider" else [first, "CPUExecutionProvider"]
    if name != "CPUExecutionProvider":
        ort.set_default_logger_severity(4)  # a GPU provider that cannot load logs errors; we report it ourselves
    try:
        sess = ort.InferenceSession(src, opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own types; name the provider in the message
        if name == "CPUExecutionProvider":
            raise
        raise ProviderUnavailable(f"{name} could not load the model: {str(e).splitlines()[0]}") from e
    finally:
        ort.set_default_logger_severity(2)
    ran = sess.get_providers()[0]
    if ran != name:
        raise ProviderUnavailable(f"{name} requested but onnxruntime would run {ran} "
                                  f"(available here: {', '.join(ort.get_available_providers())})")
    return sess


ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def onnx_input_name(recorded: str) -> str:
    """A recorded conditioning input's ONNX name: ``added_cond_kwargs.text_embeds`` -> ``text_embeds``."""
    return recorded.rsplit(".", 1)[-1]


UNBATCHED = "unbatched."   # gaq_backend.calibration.calibration_set's prefix of inputs without a batch axis (no torch import here)


def split_cond(cond: dict[str, np.ndarray] | None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs with one row per sample, inputs fed once) by ONNX name, from recorded or ONNX names."""
    rows, once = {}, {}
    for k, v in (cond or {}).items():
        if k.startswith(UNBATCHED):
            once[onnx_input_name(k)] = np.asarray(v)[0]   # recorded as rows of one value
        else:
            rows[onnx_input_name(k)] = np.asarray(v)
    return rows, once


def make_feed(session, x: np.ndarray, t_value, rows: dict[str, np.ndarray], once: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One call's inputs: ``x`` under the graph's first input, the timestep as the graph declares it (rank 0 for
    UNets, ``[batch]`` for transformers), the per-row inputs and those fed once, in the declared dtypes."""
    ins = session.get_inputs()
    declared = {i.name: ORT_DTYPES.get(i.type, np.float32) for i in ins}
    t_in = next(i for i in ins if i.name == "timestep")
    t = np.asarray(t_value, dtype=declared["timestep"])
    feed = {ins[0].name: np.ascontiguousarray(x, dtype=declared[ins[0].name]),
            "timestep": np.full((len(x),), t, dtype=t.dtype) if len(t_in.shape) == 1 else t}
    feed.update({k: np.ascontiguousarray(v, dtype=declared[k]) for k, v in rows.items() if k in declared})
    feed.update({k: np.ascontiguousarray(v, dtype=declared[k]) for k, v in once.items() if k in declared})
    return feed


def predict_noise(session, x: np.ndarray, t: np.ndarray, batch_size: int = 64, cond: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The denoiser's prediction for rows ``x`` at timesteps ``t`` (N,), with conditioning inputs ``cond`` (by
    recorded or ONNX name, N rows each; ``unbatched.<name>`` ones are fed once). Rows are grouped by timestep: each
    call feeds one timestep, as a pipeline does (the exported contract, exporters/signature.py)."""
    ins = session.get_inputs()
    declared = {i.name: ORT_DTYPES.get(i.type, np.float32) for i in ins}
    if declared.get("timestep") in (np.int64, np.int32):
        raise ValueError("this ONNX file was exported by an older gaq (an integer timestep per row); export it again with gaq export")
    rows, once = split_cond(cond)
    missing = sorted(set(declared) - {ins[0].name, "timestep"} - set(rows) - set(once))
    if missing:
        raise ValueError(f"the model also needs the inputs {', '.join(missing)}")
    t = np.asarray(t).reshape(-1)
    out: np.ndarray | None = None
    for value in dict.fromkeys(t.tolist()):  # distinct timesteps, in order
        idx = np.flatnonzero(t == value)
        for i in range(0, len(idx), batch_size):
            r = idx[i: i + batch_size]
            y = session.run(None, make_feed(session, x[r], value, {k: v[r] for k, v in rows.items()}, once))[0]
            if out is None:
                out = np.empty((len(x), *y.shape[1:]), dtype=y.dtype)
            out[r] = y
    return out


def metadata(path: str) -> dict[str, str]:
    """The model's custom metadata; a one-line error for a missing or unreadable file."""
    import onnxruntime as ort

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such ONNX file: {path}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        raise ValueError(f"{path} is not a loadable ONNX model: {str(e).splitlines()[0][:200]}") from e
    return dict(sess.get_modelmeta().custom_metadata_map)
