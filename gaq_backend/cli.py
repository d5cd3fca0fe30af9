"""``gaq``: a thin command-line shell over the library."""
from __future__ import annotations

import argparse
import os
import sys


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .pipeline import default_out_dir, run_recipe
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    out = args.out or default_out_dir(recipe)
    report = run_recipe(recipe, out, progress=not args.quiet)
    m, t = report["metrics"], report["timings"]
    print(f"{report['algorithm']} W{report['w_bits']}A{report['a_bits']}: noise_mse {m['noise_mse']:.6f}, "
          f"sample_mse_vs_fp {m['sample_mse_vs_fp']:.6f}; capture {t['capture']:.1f}s, calibration {t['calibration']:.1f}s, "
          f"total {t['total']:.1f}s")
    print(f"wrote {out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.fid_eval import evaluate_dir
    from .evaluation.reference import default_reference

    if args.num_samples < 4:
        raise ValueError(f"--num-samples must be at least 4; got {args.num_samples}")
    res = evaluate_dir(args.dir, args.reference or default_reference(), args.num_samples, args.seed, args.steps, args.batch_size,
                       args.reference_count, args.cache_dir, progress=not args.quiet)
    n, ref = res["n_samples"], res["reference"]
    print(f"n = {n} samples per model, reference {ref['name']} ({ref['n']} images), {res['sampler']['num_inference_steps']} DDIM steps")
    for name in ("fp", "quantized"):
        m = res[name]
        extra = f", FID vs FP {m['fid_vs_fp']:.2f}" if "fid_vs_fp" in m else ""
        print(f"{name:9s} FID {m['fid']:.2f}  sFID {m['sfid']:.2f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}{extra}")
    print(f"wrote {os.path.join(args.dir, 'eval.json')}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .models.train import TrainConfig, train

    out = train(TrainConfig(out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, ema_start=args.ema_start, threads=args.threads))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="gaq", description="Post-training quantization of diffusion UNets.")
    p.add_argument("--version", action="version", version=f"gaq {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", parents=[common], help="calibrate and quantize a UNet from a recipe")
    q.add_argument("recipe", help="YAML recipe, e.g. recipes/ddpm-mnist-w4a8.yaml")
    q.add_argument("--out", help="output folder (default: out/<recipe>-<algorithm>)")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key by dotted path, e.g. --set algorithm=minmax --set quantization.w_bits=8")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", parents=[common], help="FID / sFID / precision / recall of a quantized folder and its FP model")
    e.add_argument("dir", help="output folder of gaq quantize")
    e.add_argument("--reference", help="MNIST IDX file, folder of PNG/JPEG, or 'embedded-digits' "
                   "(default: $GAQ_MNIST_TEST, else ../shared/data/mnist test set, else embedded-digits)")
    e.add_argument("--num-samples", type=int, default=2000)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--steps", type=int, help="DDIM steps (default: the recipe's sampler)")
    e.add_argument("--batch-size", type=int, default=250)
    e.add_argument("--reference-count", type=int, help="use only the first N reference images")
    e.add_argument("--cache-dir", default=".cache/gaq")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_cmd_eval)

    t = sub.add_parser("train", parents=[common], help="train the embedded MNIST DDPM (resumes from OUT.ckpt)")
    t.add_argument("--out", default=os.path.join("gaq_backend", "assets", "ddpm-mnist"))
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--ema-start", type=int, default=2000)
    t.add_argument("--threads", type=int, default=0)
    t.set_defaults(func=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("gaq: interrupted; no output was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # ConfigError and UnsupportedLayerError are ValueErrors
        if args.debug:
            raise
        print(f"gaq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
