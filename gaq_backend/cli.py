"""``gaq``: a thin command-line shell over the library."""
from __future__ import annotations

import argparse
import math
import os
import sys

from .config import INT_MAX, SEED_MAX, ConfigError
from .utils.errors import one_line
from .utils.inputs import InputError, check_input
from .utils.io import OutputError, check_distinct

# errors that describe bad input in words meant for the user (plain ValueErrors are gaq's own input checks too)
INPUT_ERRORS = (ConfigError, InputError, OutputError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .pipeline import default_out_dir, run_recipe
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    out = args.out or default_out_dir(recipe)
    report = run_recipe(recipe, out, progress=not args.quiet, overwrite=args.overwrite, recipe_path=args.recipe, dry_run=args.dry_run,
                        device=args.device)
    if report is None:
        print(f"dry run: recipe, model and output folder {out} check out; nothing written")
        return 0
    if report.get("written") is False:   # a torchrun rank other than 0: rank 0 reports and writes
        return 0
    m, t = report["metrics"], report["timings"]
    wide = report["layers"].get("w_bits", {})
    mixed = f" (mixed: {len(wide)} layers at other weight bits, {report['weight_bytes']['extra_fraction']:+.1%} weight bytes)" if wide else ""
    print(f"{report['algorithm']} W{report['w_bits']}A{report['a_bits']}{mixed}: noise_mse {m['noise_mse']:.6f}, "
          f"sample_mse_vs_fp {m['sample_mse_vs_fp']:.6f}; capture {t['capture']:.1f}s, calibration {t['calibration']:.1f}s, "
          f"total {t['total']:.1f}s")
    print(f"wrote {out}")
    return 0


def _cmd_eval_pipeline(args: argparse.Namespace) -> int:
    from . import distributed
    from .evaluation import pipeline_eval
    from .pipeline import resolve_device

    pe = pipeline_eval
    if args.reference or args.reference_count:
        raise ValueError("--reference: a pipeline is evaluated against its FP pipeline's images, not a reference set")
    n = args.num_samples or pe.default_count(args.dir, args.prompts)
    if args.sample_only:
        fp, q, info = pe.sample_pipelines(args.dir, args.prompts, n, args.seed, args.steps, args.batch_size,
                                          progress=not args.quiet, device=resolve_device(args.device))
        if not distributed.is_main():
            return 0
        pe.write_pipeline_images(args.dir, fp, q, info)
        print(f"wrote {os.path.join(args.dir, pe.IMAGES_FILE)} (score it with gaq eval {args.dir} --from-images)")
        return 0
    res = pe.evaluate_pipeline_dir(args.dir, args.prompts, n, args.seed, args.steps, args.batch_size, args.clip,
                                   progress=not args.quiet, device="cpu" if args.from_images else resolve_device(args.device),
                                   from_images=args.from_images)
    if res is None:   # a torchrun rank other than 0
        return 0
    m = res["metrics"]
    print(f"{res['pipeline']}: n = {n} image pairs from the same prompts and seeds, {res['sampler']['num_inference_steps']} steps")
    print(f"quantized vs FP: PSNR {_mean(m['psnr'])} dB  SSIM {_mean(m['ssim'])}  FID vs FP {m['fid_vs_fp']:.2f}")
    if "clip_score" in m:
        print(f"CLIP score: FP {_mean(m['clip_score']['fp'])}  quantized {_mean(m['clip_score']['quantized'])}")
    print(f"wrote {os.path.join(args.dir, 'eval.json')} and eval-samples.png")
    return 0


def _join_torchrun(args: argparse.Namespace) -> bool:
    """Join torchrun's process group when launched by it: whether this process is one of several."""
    from . import distributed
    from .pipeline import resolve_device

    return distributed.init_from_env(str(resolve_device(args.device)))


def _mean(s: dict) -> str:
    return "identical" if s["mean"] is None else f"{s['mean']:.3f} +- {s['std']:.3f}"


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import distributed
    from .evaluation import pipeline_eval
    from .evaluation.fid_eval import IMAGES_FILE, evaluate_dir, sample_dir
    from .evaluation.reference import default_reference
    from .pipeline import resolve_device

    check_input(args.dir, "DIR", "folder")
    if _join_torchrun(args):
        if args.from_images:
            raise ValueError("--from-images scores images already sampled: there is nothing to split over processes; "
                             "run it without torchrun")
        args.quiet = args.quiet or not distributed.is_main()   # every rank samples a share; rank 0 scores and writes
    if args.prompts or args.clip or pipeline_eval.from_pipeline(args.dir):
        return _cmd_eval_pipeline(args)
    args.num_samples = args.num_samples or 2000
    if args.sample_only:
        info = sample_dir(args.dir, args.num_samples, args.seed, args.steps, args.batch_size, progress=not args.quiet,
                          device=resolve_device(args.device), cache_dir=args.cache_dir)
        if not distributed.is_main():
            return 0
        t = info["timings"]
        print(f"{args.num_samples} FP{' (cached)' if info['fp_from_cache'] else ''} and quantized samples in "
              f"{t['sample_fp'] + t['sample_quantized']:.1f}s on {info['device']}; "
              f"wrote {os.path.join(args.dir, IMAGES_FILE)} (score it with gaq eval {args.dir} --from-images)")
        return 0
    res = evaluate_dir(args.dir, args.reference or default_reference(), args.num_samples, args.seed, args.steps, args.batch_size,
                       args.reference_count, args.cache_dir, progress=not args.quiet,
                       device="cpu" if args.from_images else resolve_device(args.device), from_images=args.from_images)
    if res is None:   # a torchrun rank other than 0
        return 0
    n, ref = res["n_samples"], res["reference"]
    print(f"n = {n} samples per model, reference {ref['name']} ({ref['n']} images), {res['sampler']['num_inference_steps']} DDIM steps")
    for name in ("fp", "quantized"):
        m = res[name]
        extra = f", FID vs FP {m['fid_vs_fp']:.2f}" if "fid_vs_fp" in m else ""
        print(f"{name:9s} FID {m['fid']:.2f}  sFID {m['sfid']:.2f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}{extra}")
    print(f"wrote {os.path.join(args.dir, 'eval.json')}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from exporters.onnx_export import export_quantized

    check_input(args.dir, "DIR", "folder")
    if not args.out and not args.diagnose:
        raise ValueError("gaq export needs --out (the .onnx file to write), or --diagnose to locate a parity failure without writing")
    if args.diagnose:
        from exporters.parity_debug import diagnose_folder

        print(diagnose_folder(args.dir, args.weights, args.opset))
        return 0
    if args.optimum_from:
        from exporters.optimum_layout import export_into_optimum

        res = export_into_optimum(args.dir, args.optimum_from, args.out, progress=not args.quiet, weights=args.weights, opset=args.opset,
                                  check_samples=args.check_samples, external_data=True if args.external_data else None,
                                  runtime=args.runtime, matmul_nbits=args.matmul_nbits)
    else:
        res = export_quantized(args.dir, args.out, args.weights, args.opset, args.check_samples,
                               True if args.external_data else None, progress=not args.quiet, overwrite=args.overwrite,
                               runtime=args.runtime, matmul_nbits=args.matmul_nbits)
    p = res.parity
    print(f"{res.weights} weights, opset {res.opset}: {res.n_quantize} QuantizeLinear / {res.n_dequantize} DequantizeLinear, "
          f"{res.file_mb:.2f} MB")
    b = p["bounds"]
    print(f"{p['runtime']} vs PyTorch on {p['n_inputs']} held-out calibration inputs, in output INT8 steps of {p['output_step']:.4g}: "
          f"mean {p['mean_steps']:.3f}, p99 {p['p99_steps']:.2f}, max {p['max_steps']:.2f}; torch float64 vs float32: "
          f"mean {p['float64_vs_float32']['mean_steps']:.3f}, max {p['float64_vs_float32']['max_steps']:.2f}; "
          f"bounds: mean {b['mean_steps']:.3f}, max {b['max_steps']:.2f}")
    if "layers" in p:
        print(f"each of {p['layers']['checked']} quantized layers fed onnxruntime's own input: max relative difference "
              f"{p['layers']['max_rel_diff']:.1e} (tolerance {p['layers']['tolerance']:g})")
    print(f"wrote {os.path.abspath(args.out) if args.optimum_from else res.path}")
    from exporters.validate import int8_kernel_warning, rounding_flip_warning

    for warning in (int8_kernel_warning(p), rounding_flip_warning(p)):
        if warning:
            print(f"gaq: warning: {warning}", file=sys.stderr)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np

    from exporters.ort_sampler import sample

    from .evaluation.images import grid, is_gaq_png, save_grid, to_uint8
    from .utils.io import atomic_path, check_output_file

    check_input(args.onnx, "--onnx", "file")
    check_output_file(args.out, args.overwrite, is_gaq_png)
    if args.npy:
        check_output_file(args.npy, args.overwrite, flag="--npy")
    check_distinct({"--out": args.out, "--npy": args.npy}, {"--onnx": args.onnx, "--noise": args.noise})
    noise = _load_noise(args.noise) if args.noise else None
    imgs = sample(args.onnx, args.num_samples, args.seed, args.steps, args.eta, noise, args.batch_size, args.provider,
                  progress=not args.quiet, runtime=args.runtime, precision=args.precision)
    with atomic_path(args.out) as tmp:
        save_grid(tmp, grid(to_uint8(imgs)))
    if args.npy:
        with atomic_path(args.npy) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, imgs)
    print(f"wrote {args.out}" + (f" and {args.npy}" if args.npy else "") + f" ({len(imgs)} images)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from exporters.bench import run_bench

    from .utils.io import check_output_file

    for d in args.dirs:
        check_input(d, "DIRS", "folder")
    check_output_file(args.json, args.overwrite, flag="--json")
    if args.markdown:
        check_output_file(args.markdown, args.overwrite, flag="--markdown")
    check_distinct({"--json": args.json, "--markdown": args.markdown}, {f"DIRS {d}": d for d in args.dirs})
    config = {}
    for item in args.ort_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--ort-option takes KEY=VALUE; got {item!r}")
        config[key] = value
    rows = run_bench(args.dirs, args.provider, args.batch, args.repeats, args.warmup, args.threads, args.json,
                     args.markdown, args.work_dir, progress=not args.quiet, session_config=config, runtime=args.runtime)
    print(f"wrote {args.json} ({len(rows)} rows)" + (f" and {args.markdown}" if args.markdown else ""))
    return 0


def _read_unet_config(path: str) -> dict:
    """A JSON object of diffusers ``UNet2DModel`` keyword arguments (the architecture ``gaq train`` builds)."""
    from .models.embedded import build_unet
    from .utils.inputs import check_input, read_json_object, reading

    config = read_json_object(check_input(path, "--unet-config", "file"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # a saved config.json's _class_name etc.
    with reading(path, "set of UNet2DModel arguments"):
        build_unet(config)  # diffusers refuses an unknown block type or mismatched lengths here, before any training
    return config


def _cmd_train(args: argparse.Namespace) -> int:
    from .models.train import TrainConfig, train
    from .pipeline import resolve_device

    out = train(TrainConfig(out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            ema_start=args.ema_start, threads=args.threads, device=str(resolve_device(args.device)),
                            unet_config=_read_unet_config(args.unet_config) if args.unet_config else None),
                overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _load_noise(path: str):
    import numpy as np

    from .utils.inputs import reading

    check_input(path, "--noise", "file")
    with reading(path, ".npy file of noise (N, C, H, W)"):
        noise = np.load(path, allow_pickle=False)
        if not isinstance(noise, np.ndarray):
            noise.close()
            raise ValueError("an .npz archive, not one .npy array")
    if noise.ndim != 4 or not np.issubdtype(noise.dtype, np.floating) or not np.isfinite(noise).all():
        raise ValueError(f"--noise {path}: expected finite float noise of shape (N, C, H, W); got {noise.dtype} {noise.shape}")
    return noise


# ---------------------------------------------------------------------------------------------
# Argument types: every numeric flag is checked when the arguments are read, with its allowed range.

def _int_in(lo: int, hi: int = INT_MAX):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer; got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}]; got {v}")
        return v
    return parse


def _float_in(lo: float, hi: float):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number; got {text!r}") from None
        if not (math.isfinite(v) and lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"must be a number in [{lo:g}, {hi:g}]; got {text}")
        return v
    return parse


POSITIVE, NON_NEGATIVE, SEED_ARG = _int_in(1), _int_in(0), _int_in(0, SEED_MAX)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"gaq: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from exporters.openvino_runtime import PRECISIONS
    from exporters.runtimes import RUNTIMES

    from . import __version__

    p = _Parser(prog="gaq", description="Post-training quantization of diffusion UNets.")
    p.add_argument("--version", action="version", version=f"gaq {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    overwrite = argparse.ArgumentParser(add_help=False)
    overwrite.add_argument("--overwrite", action="store_true",
                           help="write into an existing output that gaq did not write (only gaq's own files are replaced)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", parents=[common, overwrite], help="calibrate and quantize a UNet from a recipe")
    q.add_argument("recipe", help="YAML recipe, e.g. recipes/ddpm-mnist-w4a8.yaml")
    q.add_argument("--out", help="output folder (default: out/<recipe>-<algorithm>)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key by dotted path, e.g. --set algorithm=minmax --set quantization.w_bits=8")
    q.add_argument("--dry-run", action="store_true", help="check the recipe, the model and the output folder, then stop")
    q.add_argument("--device", help="where the model computes: cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", parents=[common], help="FID / sFID / precision / recall of a quantized folder and its FP model; "
                         "for a pipeline: PSNR / SSIM / FID / CLIP score of its images against the FP pipeline's")
    e.add_argument("dir", help="output folder of gaq quantize")
    e.add_argument("--reference", help="MNIST IDX file, folder of PNG/JPEG, or 'embedded-digits' "
                   "(default: $GAQ_MNIST_TEST, else ../shared/data/mnist test set, else embedded-digits)")
    e.add_argument("--num-samples", type=_int_in(4), help="images per model (default: 2000; a pipeline: one per prompt, "
                   "or 8 per class label)")
    e.add_argument("--prompts", help="pipeline folders: text file of prompts, one a line (images cycle through them)")
    e.add_argument("--clip", metavar="DIR", help="pipeline folders: a local CLIP model folder for CLIP scores of both models")
    e.add_argument("--seed", type=SEED_ARG, default=0)
    e.add_argument("--steps", type=_int_in(1, 1000), help="DDIM steps (default: the recipe's sampler)")
    e.add_argument("--batch-size", type=POSITIVE, default=250)
    e.add_argument("--reference-count", type=_int_in(2), help="use only the first N reference images")
    e.add_argument("--cache-dir", default=".cache/gaq")
    e.add_argument("--device", help="where both models sample: cpu, cuda, ... (default: cuda when available, else cpu)")
    e.add_argument("--quiet", action="store_true")
    how = e.add_mutually_exclusive_group()
    how.add_argument("--sample-only", action="store_true",
                     help="only sample both models into DIR/eval-images.npz (no feature network needed, e.g. on a GPU box; "
                          "the FP model's images are cached in --cache-dir)")
    how.add_argument("--from-images", action="store_true", help="score DIR/eval-images.npz instead of sampling")
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser("export", parents=[common, overwrite], help="export a quantized folder to ONNX with Q/DQ nodes")
    x.add_argument("dir", help="output folder of gaq quantize")
    x.add_argument("--out", help="the .onnx file to write (with --optimum-from: the new pipeline folder); required unless --diagnose")
    x.add_argument("--optimum-from", metavar="OPTIMUM_DIR",
                   help="an Optimum ONNX pipeline folder (optimum-cli export onnx): copy it to --out with this UNet in unet/")
    x.add_argument("--weights", choices=["int8", "int4"], default="int8",
                   help="weight initializers: int8 (4-bit values in INT8, takes int8 kernels) or int4 (compact, opset 21)")
    x.add_argument("--matmul-nbits", action="store_true",
                   help="with --weights int4 and quantization.w_block_size: block-quantized Linear layers as DequantizeLinear -> "
                        "MatMul with a float input, which onnxruntime runs as MatMulNBits (its kernel quantizes the input itself)")
    x.add_argument("--opset", type=_int_in(1, 99), default=21)
    x.add_argument("--check-samples", type=_int_in(1, 100_000), default=64, help="held-out calibration inputs for the parity check")
    x.add_argument("--external-data", action="store_true", help="store weights in OUT.data (automatic above 1 GiB)")
    x.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime",
                   help="the runtime of the parity check (on the CPU; OpenVINO at its f32 precision hint)")
    x.add_argument("--diagnose", action="store_true",
                   help="write nothing: compare every module's output in onnxruntime and PyTorch on a held-out input and "
                        "name the first that diverges (exporters/parity_debug.py)")
    x.add_argument("--quiet", action="store_true")
    x.set_defaults(func=_cmd_export)

    s = sub.add_parser("sample", parents=[common, overwrite], help="DDIM samples from an exported ONNX UNet (onnxruntime + NumPy, no torch)")
    s.add_argument("--onnx", required=True, help="a file written by gaq export")
    s.add_argument("--out", default="samples.png", help="PNG grid to write")
    s.add_argument("--npy", help="also save the raw images (N, C, H, W) in [-1, 1] as .npy")
    s.add_argument("--num-samples", type=_int_in(1, 1_000_000), default=16)
    s.add_argument("--seed", type=SEED_ARG, default=0, help="NumPy noise seed (not the same noise as torch's for a seed)")
    s.add_argument("--noise", help=".npy of initial noise (N, C, H, W), e.g. to match the torch sampler")
    s.add_argument("--steps", type=_int_in(1, 1000), help="DDIM steps (default: the recipe's, from the file's metadata)")
    s.add_argument("--eta", type=_float_in(0.0, 1.0))
    s.add_argument("--batch-size", type=POSITIVE, default=64)
    s.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime")
    s.add_argument("--provider", choices=["cpu", "cuda", "tensorrt", "gpu"], default="cpu",
                   help="onnxruntime: cpu, cuda, tensorrt; OpenVINO: its device, cpu or gpu")
    s.add_argument("--precision", choices=PRECISIONS, default="default",
                   help="OpenVINO's inference precision hint (default: OpenVINO's, bf16 on CPUs with bf16 units)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=_cmd_sample)

    b = sub.add_parser("bench", parents=[common, overwrite], help="onnxruntime latency of FP32 / FP16 / quantize_static W8A8 / gaq exports")
    b.add_argument("dirs", nargs="+", help="output folders of gaq quantize (their base model is benchmarked too)")
    b.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime",
                   help="openvino: every variant in OpenVINO (FP32 at its f32 hint and at its default), plus NNCF's INT8 peer")
    b.add_argument("--provider", action="append", choices=["cpu", "cuda", "tensorrt", "gpu"],
                   help="repeatable (default: cpu); onnxruntime: cpu, cuda, tensorrt; OpenVINO: cpu, gpu")
    b.add_argument("--batch", type=_int_in(1, 4096), nargs="+", default=[1, 8])
    b.add_argument("--repeats", type=_int_in(3, 100_000), default=20)
    b.add_argument("--warmup", type=_int_in(0, 100_000), default=3)
    b.add_argument("--threads", type=_int_in(0, 1024), default=0, help="onnxruntime intra-op threads (0: its default)")
    b.add_argument("--json", required=True, help="rows as JSON")
    b.add_argument("--markdown", help="also write a markdown table")
    b.add_argument("--ort-option", action="append", default=[], metavar="KEY=VALUE",
                   help="onnxruntime session config entry for every session, e.g. session.disable_quant_qdq=1")
    b.add_argument("--work-dir", default=".cache/gaq/bench", help="where the exported variants are kept")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_cmd_bench)

    t = sub.add_parser("train", parents=[common, overwrite], help="train the embedded MNIST DDPM (resumes from OUT.ckpt)")
    t.add_argument("--out", default=os.path.join("gaq_backend", "assets", "ddpm-mnist"))
    t.add_argument("--steps", type=POSITIVE, default=8000)
    t.add_argument("--batch-size", type=_int_in(1, 65536), default=128)
    t.add_argument("--lr", type=_float_in(1e-12, 1.0), default=2e-4)
    t.add_argument("--seed", type=SEED_ARG, default=0)
    t.add_argument("--ema-start", type=NON_NEGATIVE, default=2000)
    t.add_argument("--threads", type=_int_in(0, 1024), default=0)
    t.add_argument("--device", help="where to train: cpu, cuda, ... (default: cuda when available, else cpu)")
    t.add_argument("--unet-config", metavar="JSON", help="UNet2DModel arguments to train another architecture "
                   "(default: the embedded model's; a diffusers config.json works)")
    t.set_defaults(func=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("gaq: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        return _report_error(e)


def _report_error(e: Exception) -> int:
    """One line on stderr and the exit status, for an error that reached the command line."""
    if _peer_lost(e):   # under torchrun: the rank that failed printed its own line (or died without one)
        print(f"gaq: {_rank()}stopped: another rank exited (its own line, if it printed one, names its error)", file=sys.stderr)
        return 1
    if isinstance(e, (ValueError, OSError, RuntimeError)):
        # gaq's own input errors name what to change; anything else from these classes may be a bug
        hint = "" if isinstance(e, INPUT_ERRORS) or type(e) is ValueError else " (run with --debug for the traceback)"
        print(f"gaq: error: {_rank()}{one_line(e)}{hint}", file=sys.stderr)
        return 2
    # a bug in gaq: still one line, and the way to see more
    print(f"gaq: internal error: {_rank()}{type(e).__name__}: {one_line(e, 300)} (run with --debug for the traceback)", file=sys.stderr)
    return 1


def _peer_lost(e: Exception) -> bool:
    """A collective that failed because another rank went away (Gloo: the connection closed; NCCL: the watchdog)."""
    from . import distributed

    if not distributed.active() or distributed.world()[1] == 1:
        return False
    import torch

    text = str(e)
    return isinstance(e, getattr(torch.distributed, "DistNetworkError", ())) or any(
        k in text for k in ("closed by peer", "Connection reset by peer", "remote worker crashing", "NCCL communicator was aborted"))


def _rank() -> str:
    """``rank N: `` under torchrun (each process prints its own error), else nothing."""
    from . import distributed

    rank, size = distributed.world()
    return f"rank {rank} of {size}: " if size > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
