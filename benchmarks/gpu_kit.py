"""The GPU kit: quantize on the GPU, export, and time every deployment path a GPU user has, in one offline run.
Reproduces: docs/benchmarks.md, "Deployment: OpenVINO, Optimum's pipeline, the GPU kit".

    bash benchmarks/gpu_kit.sh --out runs/gpu-kit            # on a CUDA machine: about 10 minutes
    bash benchmarks/gpu_kit.sh --dry-run --out /tmp/kit      # the plumbing on this CPU: tiny sizes, CPU providers

Models: the embedded MNIST UNet (its recipes, quantized on the GPU, W8A8 minmax and W4A8 minmax) and a
UNet2DConditionModel of SD 1.5's shape from its public config (random weights, 64x64 latent, batch 2 =
classifier-free guidance; W8A8 and W4A8 minmax on random calibration rows, which time kernels, not quality).
Rows, at batch 1 and 8 (the SD UNet: 2): torch eager FP32 and FP16; onnxruntime CUDA EP FP32 / FP16; the
TensorRT EP FP16 engine; gaq's W8A8 and W4A8 ``--weights int8`` graphs on the TensorRT EP (INT8 + FP16 enabled:
Q/DQ is explicit quantization) and on the CUDA EP. Every row names the provider that ran (never a silent CPU
fallback); TensorRT's engines are cached and, where the tensorrt module is importable, inspected for the
precision of each layer. Writes kit.json and kit.md into --out. Without CUDA (and without --dry-run) it says so
in one line and exits 1.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.memory_sd15 import SD15_UNET, calibration  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SD = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)


def torch_ms(unet, x, t, cond, repeats: int, warmup: int) -> list[float]:
    """Eager latency; CUDA events on a GPU, wall clock on the CPU."""
    cuda = x.is_cuda
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            unet(x, t, **cond)
            if cuda:
                end.record()
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end) if cuda else (time.perf_counter() - t0) * 1000)
    return times


def trt_layer_precisions(cache_dir: str) -> dict | None:
    """Layer precisions of the newest cached TensorRT engine, via TensorRT's engine inspector (None if unavailable)."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    engines = sorted(glob.glob(os.path.join(cache_dir, "*.engine")), key=os.path.getmtime)
    if not engines:
        return None
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    with open(engines[-1], "rb") as f:
        engine = runtime.deserialize_cuda_engine(f.read())
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    counts: dict = {}
    for layer in info.get("Layers", []):
        prec = layer.get("Outputs", [{}])[0].get("Format/Datatype", "?") if isinstance(layer, dict) else "?"
        counts[prec] = counts.get(prec, 0) + 1
    return counts or {"note": "engine built without detailed profiling verbosity: layer names only"}


def ort_rows(label: str, path: str, shape: list[int], batches: list[int], providers: list[tuple[str, dict]], work: str,
             repeats: int, warmup: int) -> list[dict]:
    from exporters.bench import time_session
    from exporters.ort_runtime import ProviderUnavailable, create_session

    rows = []
    for prov, options in providers:
        name = f"{label} / {prov}" + (" fp16" if options.get("trt_fp16_enable") == "True" else "")
        try:
            sess = create_session(path, prov, provider_options=options or None)
        except ProviderUnavailable as e:
            rows.append(dict(row=name, provider=None, status=f"not measured: {e}"))
            continue
        for b in batches:
            ms = time_session(sess, b, shape, repeats, warmup)
            rows.append(dict(row=name, provider=sess.get_providers()[0], batch=b, median_ms=float(np.median(ms)),
                             p10_ms=float(np.percentile(ms, 10)), p90_ms=float(np.percentile(ms, 90)), status="ok"))
        if prov == "tensorrt":
            rows[-1]["trt_layer_precisions"] = trt_layer_precisions(options.get("trt_engine_cache_path", work))
    return rows


def model_rows(tag: str, fp_unet, quantized: dict[str, str], shape: list[int], cond: dict, batches: list[int], device: str,
               rows: list[dict], save, work: str, repeats: int, warmup: int) -> None:
    """Every row for one UNet, appended to ``rows`` (``save()`` after each group, so a run cut short keeps what it
    measured): torch eager, the FP32 / FP16 exports and gaq's INT8 graphs on each provider."""
    import onnxruntime

    from exporters.onnx_export import export_fp, export_quantized

    for half in (False, True):
        if half and device == "cpu":
            rows.append(dict(row=f"{tag} torch eager fp16", provider=None, status="not measured: FP16 is a GPU variant"))
            continue
        m = (fp_unet.half() if half else fp_unet.float()).to(device)
        dt = torch.float16 if half else torch.float32
        for b in batches:
            x = torch.randn(b, *shape, device=device, dtype=dt)
            c = {k: v[:1].expand(b, *v.shape[1:]).to(device, dt if v.is_floating_point() else v.dtype) for k, v in cond.items()}
            ms = torch_ms(m, x, torch.tensor(500.0, device=device), c, repeats, warmup)
            rows.append(dict(row=f"{tag} torch eager {'fp16' if half else 'fp32'}", provider=f"torch {device}", batch=b,
                             median_ms=float(np.median(ms)), p10_ms=float(np.percentile(ms, 10)), p90_ms=float(np.percentile(ms, 90)), status="ok"))
    fp_unet.float().cpu()
    save()
    gpu = device != "cpu"
    if gpu and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        # exporting a graph no provider here can run on the GPU would only spend the lease
        rows.append(dict(row=f"{tag} onnxruntime rows", provider=None, status=f"not measured: onnxruntime {onnxruntime.__version__} here "
                         f"has no CUDA provider ({', '.join(onnxruntime.get_available_providers())})"))
        return save()
    trt_cache = os.path.join(work, "trt-cache")
    os.makedirs(trt_cache, exist_ok=True)
    trt = lambda **o: ("tensorrt", dict(trt_engine_cache_enable="True", trt_engine_cache_path=trt_cache, **o))  # noqa: E731
    fp32 = export_fp(fp_unet, os.path.join(work, f"{tag}-fp32.onnx"), opset=20)
    rows += ort_rows(f"{tag} fp32", fp32, shape, batches, [("cuda", {})] if gpu else [("cpu", {})], work, repeats, warmup)
    if gpu:
        fp16 = export_fp(fp_unet, os.path.join(work, f"{tag}-fp16.onnx"), opset=20, half=True)
        rows += ort_rows(f"{tag} fp16", fp16, shape, batches, [("cuda", {})], work, repeats, warmup)
        rows += ort_rows(f"{tag} fp32 graph", fp32, shape, batches, [trt(trt_fp16_enable="True")], work, repeats, warmup)
    for name, folder in quantized.items():
        path = os.path.join(work, f"{tag}-{name}-int8.onnx")
        export_quantized(folder, path, "int8", check_samples=4, progress=False)
        provs = [trt(trt_int8_enable="True", trt_fp16_enable="True"), ("cuda", {})] if gpu else [("cpu", {})]
        rows += ort_rows(f"{tag} gaq {name}", path, shape, batches, provs, work, repeats, warmup)
        save()


def quantize_sd(unet, bits: str, rows: int, latent: int, device: str, out: str, tiny: bool) -> float:
    """minmax on random CFG-paired rows: enough to time kernels; the quality of a random-weight UNet means nothing."""
    import gaq_backend as gaq

    calib = calibration(rows, latent, seed=0)
    if tiny:  # the tiny UNet's text width
        calib.cond["encoder_hidden_states"] = calib.cond["encoder_hidden_states"][..., :TINY_SD["cross_attention_dim"]].contiguous()
    t0 = time.perf_counter()
    q = gaq.quantize(unet.to(device), gaq.preset(bits, algorithm=gaq.MinMaxConfig()), calib, progress=False)
    seconds = time.perf_counter() - t0
    gaq.save_quantized(q.cpu(), out, overwrite=True)
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu-kit")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, CPU providers: checks the plumbing on any machine")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_kit: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 1
    from diffusers import UNet2DConditionModel

    from gaq_backend.pipeline import run_recipe
    from gaq_backend.recipe import load_recipe

    device = "cpu" if args.dry_run else "cuda"
    repeats, warmup = (3, 1) if args.dry_run else (args.repeats, args.warmup)
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "work")
    os.makedirs(work, exist_ok=True)
    t_start = time.perf_counter()
    result: dict = dict(device=torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                        dry_run=args.dry_run, torch=torch.__version__, quantize_seconds={}, rows=[])
    import onnxruntime

    result["onnxruntime"], result["available_providers"] = onnxruntime.__version__, onnxruntime.get_available_providers()

    # 1. the embedded model: the shipped recipes, quantized on the device
    # (the kit times deployment; the sensitivity report is quality work and stays out of its figures)
    overrides = ["report.sensitivity=false"] + (["calibration.n_per_step=4", "sampler.num_inference_steps=10", "calibration.interval=2",
                                                 "report.num_samples=2", "report.grid=2", "calibration.n_groups=2"] if args.dry_run else [])
    quantized = {}
    for name, recipe_file in (("w8a8", "ddpm-mnist-w8a8.yaml"), ("w4a8", "ddpm-mnist-w4a8.yaml")):
        recipe = load_recipe(os.path.join(ROOT, "recipes", recipe_file), overrides + [f"calibration.cache_dir={os.path.join(work, 'cache')}"])
        folder = os.path.join(work, f"embedded-{name}")
        report = run_recipe(recipe, folder, progress=False, overwrite=True, device=device, log=lambda *a: None)
        result["quantize_seconds"][f"embedded {name}"] = report["timings"]
        quantized[name] = folder
    from gaq_backend.models.loading import load_model

    emb = load_model("embedded").unet
    shape = [emb.config.in_channels, emb.config.sample_size, emb.config.sample_size]

    def save() -> None:
        result["seconds"] = time.perf_counter() - t_start
        write_report(result, args.out)

    model_rows("embedded", emb, quantized, shape, {}, [1, 8], device, result["rows"], save, work, repeats, warmup)

    # 2. the SD-1.5-shaped UNet (tiny in a dry run), batch 2 = classifier-free guidance
    torch.manual_seed(0)
    cfg, latent = (TINY_SD, 8) if args.dry_run else (SD15_UNET, 64)
    sd_q = {}
    for name, bits in (("w8a8", "W8A8"), ("w4a8", "W4A8")):
        folder = os.path.join(work, f"sd-{name}")
        torch.manual_seed(0)
        result["quantize_seconds"][f"sd {name}"] = quantize_sd(UNet2DConditionModel(**cfg), bits, 8, latent, device, folder, args.dry_run)
        sd_q[name] = folder
    save()
    torch.manual_seed(0)
    sd = UNet2DConditionModel(**cfg).eval()
    text = torch.zeros(1, 77, cfg["cross_attention_dim"])
    model_rows("sd15-shape" if not args.dry_run else "tiny-sd", sd, sd_q, [4, latent, latent], {"encoder_hidden_states": text}, [2],
               device, result["rows"], save, work, repeats, warmup)
    print(open(os.path.join(args.out, "kit.md")).read(), end="")
    return 0


def write_report(result: dict, out: str) -> None:
    """kit.json and kit.md, each replaced atomically: a run cut short leaves the rows measured so far."""
    lines = [f"GPU kit on {result['device']} ({'dry run' if result['dry_run'] else 'CUDA'}), onnxruntime {result['onnxruntime']}, "
             f"{result['seconds']:.0f} s", "", "| row | ran on | batch | median ms (p10-p90) |", "|---|---|---|---|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['row']} | - | - | {r['status']} |")
        else:
            lines.append(f"| {r['row']} | {r['provider']} | {r['batch']} | {r['median_ms']:.2f} ({r['p10_ms']:.2f}-{r['p90_ms']:.2f}) |")
    for name, text in (("kit.json", json.dumps(result, indent=1, default=str)), ("kit.md", "\n".join(lines) + "\n")):
        with open(os.path.join(out, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


if __name__ == "__main__":
    sys.exit(main())
