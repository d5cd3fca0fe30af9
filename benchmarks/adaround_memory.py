"""Peak resident memory per weight of AdaRound on one large convolution, above the layer itself.
Reproduces: docs/benchmarks.md, "Memory and time at Stable Diffusion size".

    python benchmarks/adaround_memory.py            # 1280 -> 1280 channels, 3x3 (14.7M weights), 6 iterations

The layer is SD 1.5's widest convolution shape; the batch (4 rows at 8x8) is small so that AdaRound's
per-weight state (V, its gradient, Adam's moments, the floors, the soft weight and the backward's
temporaries) dominates. Prints bytes per weight: the figure docs/memory.md and the memory plan's
ADAROUND_BYTES_PER_WEIGHT refer to.
"""
import argparse
import ctypes
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.memory_sd15 import rss as status  # noqa: E402


def main() -> None:
    from gaq_backend.algorithms.minmax import fit_weights
    from gaq_backend.algorithms.reconstruction import learn_rounding
    from gaq_backend.algorithms.uniform import UniformConfig
    from gaq_backend.wrapping import QuantConv2d

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=1280)
    ap.add_argument("--iters", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = QuantConv2d.from_float(nn.Conv2d(args.channels, args.channels, 3, padding=1), 4, 32)
    fit_weights(layer, "max")
    x = torch.randn(4, args.channels, 8, 8)
    with torch.no_grad():
        y = layer(x)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    cfg = UniformConfig(iters=args.iters, batch_size=4)
    learn_rounding([layer], 4, cfg.iters, cfg, torch.Generator().manual_seed(0),
                   lambda idx: (layer(x[idx]) - y[idx]).pow(2).mean(), keep_float=True)
    n = layer.weight.numel()
    print(f"{(status('VmHWM:') - base) / n:.1f} bytes per weight above the layer ({n / 1e6:.1f}M weights, {args.iters} iterations)")


if __name__ == "__main__":
    main()
