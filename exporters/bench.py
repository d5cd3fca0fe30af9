"""``gaq bench``: onnxruntime latency of a UNet's deployable variants, per provider and batch size.

Variants: ``fp32`` and ``fp16`` (GPU providers only) exports of the base FP model, onnxruntime's own
``quantize_static`` W8A8 of the FP32 graph (QDQ, per-channel symmetric INT8 weights, symmetric INT8
activations on Conv/MatMul/Gemm, calibrated by onnxruntime's MinMax on held-out calibration inputs), and
for every quantized directory its gaq export with INT8 and (4-bit weights only) INT4 initializers.
A row names the provider that ran; a provider that onnxruntime would silently replace by the CPU is
reported as not measured, never as GPU.
"""
from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from gaq_backend import __version__
from gaq_backend.utils.cache import prepare_cache_dir

from .onnx_export import check_onnx_out, export_fp, export_quantized, file_mb
from .ort_runtime import ORT_DTYPES, PROVIDERS, ProviderUnavailable, create_session


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over held-out calibration inputs."""

    def __init__(self, x: np.ndarray, t: np.ndarray, batch: int = 8):
        # one rank-0 timestep per call (the exported contract): batches of rows that share it
        self.items = []
        for value in dict.fromkeys(t.tolist()):
            rows = np.flatnonzero(t == value)
            self.items += [{"sample": x[rows[i: i + batch]], "timestep": np.asarray(value, dtype=np.float32)}
                           for i in range(0, len(rows), batch)]

    def get_next(self):
        return self.items.pop(0) if self.items else None


def _quantize_static(fp32: str, out: str, x: np.ndarray, t: np.ndarray) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from gaq_backend.utils.io import atomic_path

    with atomic_path(out) as tmp:
        quantize_static(fp32, tmp, _Reader(x, t), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        model = onnx.load(tmp)
        onnx.helper.set_model_props(model, {"gaq.version": __version__, "gaq.variant": "quantize_static-w8a8"})
        onnx.save(model, tmp)


def _nncf_int8(fp32: str, out_xml: str, x: np.ndarray, t: np.ndarray) -> None:
    """NNCF's own post-training INT8 quantization of the FP32 graph (its defaults, the same calibration inputs),
    saved as OpenVINO IR: the path a CPU user would take instead of gaq."""
    import nncf
    import openvino as ov

    from gaq_backend.utils.io import tmp_prefix

    model = ov.Core().read_model(fp32)
    items = _Reader(x, t).items
    q = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
    q.set_rt_info("nncf-int8", ["gaq", "variant"])  # marks the IR as gaq's, so a later run may replace it
    tmp = tempfile.mkdtemp(prefix=tmp_prefix("nncf-ir"), dir=os.path.dirname(os.path.abspath(out_xml)))
    try:  # the weights first: an .xml in place always has its .bin
        ov.save_model(q, os.path.join(tmp, "model.xml"), compress_to_fp16=False)
        os.replace(os.path.join(tmp, "model.bin"), out_xml[:-4] + ".bin")
        os.replace(os.path.join(tmp, "model.xml"), out_xml)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ir_work_file(work_dir: str, name: str) -> str:
    """An OpenVINO IR in the work folder; one that gaq did not write is refused, not replaced."""
    path = os.path.join(work_dir, name)
    if os.path.exists(path):
        import openvino as ov

        try:
            ours = ov.Core().read_model(path).has_rt_info(["gaq", "variant"])
        except Exception:  # OpenVINO's own error types: an unreadable file is not ours
            ours = False
        if not ours:
            raise ValueError(f"--work-dir file {path} exists and was not written by gaq; remove it or choose another --work-dir")
    return path


def _work_file(work_dir: str, name: str) -> str:
    """A variant's path in the work folder; a file of that name that gaq did not write is refused, not replaced."""
    return check_onnx_out(os.path.join(work_dir, name), False, flag="--work-dir file")


def build_variants(dirs: list[str], work_dir: str, want_fp16: bool, progress: bool, nncf_peer: bool = False) -> tuple[list[dict], list[dict]]:
    """Export every variant once into ``work_dir`` (with ``nncf_peer``, NNCF's INT8 IR of each base model
    too); returns (variants, refusals)."""
    from gaq_backend.models.loading import load_model, resolve_model_path
    from gaq_backend.recipe import USER_MODEL
    from gaq_backend.serialization import read_output_configs

    from .parity_reference import parity_inputs

    prepare_cache_dir(work_dir, "--work-dir")
    variants: list[dict] = []
    refused: list[dict] = []
    bases: set[str] = set()
    folders = [(d, *read_output_configs(d)) for d in dirs]  # every folder and work file checked before any work
    for d, _, recipe in folders:
        base = resolve_model_path(recipe.model)
        if recipe.model == USER_MODEL or os.path.isfile(os.path.join(base, "model_index.json")):
            raise ValueError(f"{d}: gaq bench times UNets quantized from a bare model folder (its recipe's model is {recipe.model!r})")
        tag = os.path.basename(os.path.normpath(base))
        for name in (f"{tag}-fp32.onnx", f"{tag}-fp16.onnx", f"{tag}-quantize_static-w8a8.onnx",
                     f"{os.path.basename(os.path.normpath(d))}-int8.onnx", f"{os.path.basename(os.path.normpath(d))}-int4.onnx"):
            _work_file(work_dir, name)
    for d, sched, recipe in folders:
        base = resolve_model_path(recipe.model)
        if base not in bases:
            bases.add(base)
            tag = os.path.basename(os.path.normpath(base))
            fp = load_model(recipe.model, recipe.model_options).unet
            shape = [fp.config.in_channels, fp.config.sample_size, fp.config.sample_size]
            # opset 20: onnxruntime 1.31's Q/DQ propagation breaks quantize_static's graph at opset 21
            fp32 = export_fp(fp, _work_file(work_dir, f"{tag}-fp32.onnx"), opset=20)
            variants.append(dict(variant="fp32", source=base, path=fp32, shape=shape))
            if want_fp16:
                variants.append(dict(variant="fp16", source=base, path=export_fp(fp, _work_file(work_dir, f"{tag}-fp16.onnx"), opset=20, half=True),
                                     shape=shape, gpu_only=True))
            x, t, _ = parity_inputs(recipe, sched, 64, progress)
            qs = _work_file(work_dir, f"{tag}-quantize_static-w8a8.onnx")
            _quantize_static(fp32, qs, x.numpy(), t.numpy())
            variants.append(dict(variant="quantize_static-w8a8", source=base, path=qs, shape=shape))
            if nncf_peer:
                ir = _ir_work_file(work_dir, f"{tag}-nncf-int8.xml")
                _nncf_int8(fp32, ir, x.numpy(), t.numpy())
                variants.append(dict(variant="nncf-int8", source=base, path=ir, shape=shape, openvino_only=True))
        qcfg = recipe.quant_config()
        bits = f"w{qcfg.w_bits}a{qcfg.a_bits}"
        for form in ("int8", "int4") if qcfg.w_bits <= 4 else ("int8",):
            name = f"{bits}-{form}"
            out = _work_file(work_dir, f"{os.path.basename(os.path.normpath(d))}-{form}.onnx")
            try:
                export_quantized(d, out, form, progress=progress)
            except ValueError as e:
                refused.append(dict(variant=name, source=d, reason=str(e)))
                continue
            variants.append(dict(variant=name, source=d, algorithm=recipe.algorithm, path=out, shape=shape))
    return variants, refused


def time_session(session, batch: int, shape: list[int], repeats: int, warmup: int) -> list[float]:
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((batch, *shape), dtype=np.float32), "timestep": np.asarray(500.0, dtype=np.float32)}
    for inp in session.get_inputs():  # conditioning inputs: zeros of the declared shape (dynamic axes: batch, then 8)
        if inp.name not in feed:
            dims = [d if isinstance(d, int) else (batch if k == 0 else 8) for k, d in enumerate(inp.shape)]
            feed[inp.name] = np.zeros(dims, dtype=ORT_DTYPES.get(inp.type, np.float32))
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def _timed_row(base: dict, sess, b: int, shape: list[int], repeats: int, warmup: int) -> dict:
    ms = time_session(sess, b, shape, repeats, warmup)
    row = dict(base, provider=sess.get_providers()[0], batch=b, median_ms=float(np.median(ms)),
               p10_ms=float(np.percentile(ms, 10)), p90_ms=float(np.percentile(ms, 90)),
               images_per_s=b / float(np.median(ms)) * 1000, repeats=repeats, status="ok")
    if hasattr(sess, "executed_precisions"):
        row["executed"] = sess.executed_precisions()
    return row


def _bench_openvino(v: dict, device: str, batches: list[int], threads: int, repeats: int, warmup: int) -> list[dict]:
    """OpenVINO rows of one variant: FP32 twice (the f32 hint, an honest FP32 baseline, and OpenVINO's default,
    bf16 on CPUs that have it: what users get), every other variant at the default; compiled per batch with
    static shapes, as a deployment would."""
    from .openvino_runtime import OpenVINOSession, OpenVINOUnavailable

    rows = []
    base = dict(variant=v["variant"], source=v["source"], file_mb=round(file_mb(v["path"]), 3))
    for precision in ("f32", "default") if v["variant"] == "fp32" else ("default",):
        for b in batches:
            try:
                sess = OpenVINOSession(v["path"], device, threads, precision, static={"sample": [b, *v["shape"]]})
            except OpenVINOUnavailable as e:
                return [dict(base, provider=None, requested=f"OpenVINO {device}", batch=None, median_ms=None, status=f"not measured: {e}")]
            rows.append(_timed_row(dict(base, precision=sess.precision, requested_precision=precision), sess, b, v["shape"], repeats, warmup))
    return rows


def run_bench(dirs: list[str], providers: list[str] | None, batches: list[int], repeats: int = 20, warmup: int = 3,
              threads: int = 0, json_path: str = "bench.json", markdown: str | None = None,
              work_dir: str = ".cache/gaq/bench", progress: bool = True,
              session_config: dict[str, str] | None = None, runtime: str = "onnxruntime") -> list[dict[str, Any]]:
    """Rows of (variant, provider, batch) timings; ``runtime="openvino"`` runs every variant in OpenVINO (providers
    name its devices: cpu, gpu) and adds NNCF's own INT8 quantization of the FP32 graph as the peer row."""
    from gaq_backend.utils.io import atomic_path, write_json

    providers = providers or ["cpu"]
    if repeats < 3 or warmup < 0 or not batches or min(batches) < 1:
        raise ValueError("--repeats must be at least 3, --warmup non-negative and every --batch at least 1")
    if runtime not in ("onnxruntime", "openvino"):
        raise ValueError(f"--runtime {runtime!r} (allowed: onnxruntime, openvino)")
    if runtime == "openvino":
        from .openvino_runtime import DEVICES
        bad = [p for p in providers if p not in DEVICES]
        if bad:
            raise ValueError(f"--provider {bad[0]} is not an OpenVINO device (allowed with --runtime openvino: {', '.join(DEVICES)})")
    variants, refused = build_variants(dirs, work_dir, runtime == "onnxruntime" and any(p != "cpu" for p in providers), progress,
                                       nncf_peer=runtime == "openvino")
    rows: list[dict[str, Any]] = [dict(variant=r["variant"], source=r["source"], provider=None, batch=None, median_ms=None,
                                       file_mb=None, status=f"not exported: {r['reason']}") for r in refused]
    bar = tqdm(total=len(providers) * len(variants), desc="bench", disable=not progress, leave=False)
    for prov in providers:
        for v in variants:
            bar.update(1)
            if runtime == "openvino":
                rows += _bench_openvino(v, prov, batches, threads, repeats, warmup)
                continue
            base = dict(variant=v["variant"], source=v["source"], file_mb=round(file_mb(v["path"]), 3))
            if v.get("openvino_only"):
                rows.append(dict(base, provider=None, requested=PROVIDERS[prov], batch=None, median_ms=None,
                                 status="not measured: an OpenVINO IR (--runtime openvino)"))
                continue
            if v.get("gpu_only") and prov == "cpu":
                rows.append(dict(base, provider=None, requested=PROVIDERS[prov], batch=None, median_ms=None,
                                 status="not measured: FP16 is a GPU variant"))
                continue
            try:
                sess = create_session(v["path"], prov, threads, session_config)
            except ProviderUnavailable as e:
                rows.append(dict(base, provider=None, requested=PROVIDERS[prov], batch=None, median_ms=None, status=f"not measured: {e}"))
                continue
            rows += [_timed_row(base, sess, b, v["shape"], repeats, warmup) for b in batches]
    bar.close()
    import onnxruntime

    env = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), threads=threads or "runtime default",
               runtime=runtime, onnxruntime=onnxruntime.__version__, session_config=session_config or {})
    if runtime == "openvino":
        import openvino

        env["openvino"] = openvino.__version__
    for r in rows:
        r["environment"] = env
    write_json(json_path, rows)
    if markdown:
        with atomic_path(markdown) as tmp, open(tmp, "w") as f:
            f.write(markdown_table(rows))
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """One line per row; speed-ups against the FP32 row of the same provider and batch (OpenVINO: at its f32
    hint, and against its default precision, bf16 where the CPU has it), with the INT8 share of OpenVINO's kernels."""
    from .openvino_runtime import int8_share

    def device(r):  # "OpenVINO CPU f32" and "OpenVINO CPU bf16" are one device
        return r["provider"].rsplit(" ", 1)[0] if r.get("precision") else r["provider"]
    fp32 = {(device(r), r["batch"], r.get("requested_precision", "f32")): r["median_ms"]
            for r in rows if r["variant"] == "fp32" and r["median_ms"]}
    lines = ["| variant | source | runs on | batch | median ms (p10-p90) | images/s | vs FP32 | vs runtime default | INT8 kernels | file MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        src = os.path.basename(os.path.normpath(r["source"]))
        if r["median_ms"] is None:
            lines.append(f"| {r['variant']} | {src} | {r.get('requested') or '-'} | - | {r['status']} | - | - | - | - | {r['file_mb'] or '-'} |")
            continue
        speed = [fp32.get((device(r), r["batch"], p)) for p in ("f32", "default")]
        speed = [f"{ref / r['median_ms']:.2f}x" if ref else "-" for ref in speed]
        kernels = int8_share(r["executed"]) if "executed" in r else "-"
        lines.append(f"| {r['variant']} | {src} | {r['provider']} | {r['batch']} | {r['median_ms']:.2f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f}) "
                     f"| {r['images_per_s']:.1f} | {speed[0]} | {speed[1]} | {kernels} | {r['file_mb']:.2f} |")
    return "\n".join(lines) + "\n"
