"""Calibration across processes with ``torch.distributed``, launched by ``torchrun`` (docs/distributed.md).

gaq adds no launcher, pool or protocol of its own: ``torchrun --nproc-per-node N -m gaq_backend.cli quantize R``
starts N processes, :func:`init_from_env` joins them into torch's default process group (NCCL on GPUs, Gloo on
CPUs; several machines through torchrun's rendezvous), and the calibration code asks :func:`world` who it is.

What is split (data parallel): each rank holds the calibration rows ``rank::world`` of every reconstruction unit's
cache (its inputs and FP targets: memory per rank / N), and computes the loss terms of its own rows of each
iteration's global batch, which one generator, seeded alike on every rank, draws as one process would. The
gradients of AdaRound's V and of the activation step sizes are summed over ranks (one all-reduce per iteration),
so every rank takes the same step and holds the same model (``gradient_aligned``'s meta-gradient likewise). The
sampling of a capture or an evaluation is split by batches (:func:`share`) and gathered in rank order
(:func:`gather_rows`): the rows one process gets. What is not split (every rank computes it, alike): the initial
ranges, ``temporal``'s time path (one row per timestep). Rank 0 writes the output.
"""
from __future__ import annotations

import hashlib
import os
from datetime import timedelta

import torch

TIMEOUT = timedelta(seconds=int(os.environ.get("GAQ_DIST_TIMEOUT", "300")))   # a dead rank stops the others within it


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if not active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main() -> bool:
    return world()[0] == 0


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def init_from_env(device: str | None = None) -> bool:
    """Join torchrun's process group (once); returns whether this process is one of several. NCCL when the
    processes compute on CUDA, else Gloo; each process uses GPU ``LOCAL_RANK``."""
    if active() or not launched_by_torchrun():
        return active() and world()[1] > 1
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return world()[1] > 1


def device_of_rank(device: torch.device) -> torch.device:
    """A CUDA device means this rank's GPU under torchrun."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def owned(n: int) -> torch.Tensor:
    """Indices of the rows ``0..n-1`` this rank holds: ``rank::world``."""
    rank, size = world()
    return torch.arange(rank, n, size, device="cpu")


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")


def sum_tensors(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Each tensor summed over ranks (one all-reduce of their concatenation in ``dtype``, default their widest),
    same dtypes and devices back. Every rank must pass the same shapes and reach the same ``dtype``."""
    if not active() or not tensors:
        return tensors
    if dtype is None:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.detach().reshape(-1).to(_comm_device(), dtype) for t in tensors])
    torch.distributed.all_reduce(flat)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i: i + t.numel()].reshape(t.shape).to(t.device, t.dtype))
        i += t.numel()
    return out


def sum_gradients(params: list[torch.Tensor], extra: list[torch.Tensor] = ()) -> list[torch.Tensor]:
    """Sum ``params``' gradients over ranks in place (a rank with no row in the batch contributes zeros), with
    ``extra`` tensors (e.g. the loss, for the record) in the same all-reduce; returns the summed ``extra``."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    # the parameters' dtype, the same on every rank (a loss may be float64 on one and an empty part on another)
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    summed = sum_tensors(grads + list(extra), dtype)
    for p, g in zip(params, summed):
        p.grad = g
    return summed[len(params):]


def share(n: int) -> range:
    """This rank's contiguous share of ``n`` work items (sampling batches, pipeline calls). Shares follow rank
    order, so concatenating the ranks' results in rank order (:func:`gather_rows`) gives one process's."""
    rank, size = world()
    q, r = divmod(n, size)
    start = rank * q + min(rank, r)
    return range(start, start + q + (rank < r))


def agree(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (e.g. every rank found the cache): the same answer everywhere."""
    if not active() or world()[1] == 1:
        return flag
    (ok,) = sum_tensors([torch.tensor([0.0 if flag else 1.0])])
    return float(ok) == 0


def gather_rows(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """Every rank's rows (the first axis) of each named tensor, concatenated in rank order, on every rank and on
    the host. A rank that holds no rows passes None; the others must pass the same names and trailing shapes."""
    if not active() or world()[1] == 1:
        return dict(tensors or {})
    size = world()[1]
    meta = None if tensors is None else {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()}
    seen: list = [None] * size
    torch.distributed.all_gather_object(seen, meta)   # names, shapes and dtypes (a few bytes): the rows go as tensors
    held = [m for m in seen if m is not None]
    if not held:
        return {}
    ref = held[0]
    if any(set(m) != set(ref) or any(m[k][0][1:] != ref[k][0][1:] or m[k][1] != ref[k][1] for k in ref) for m in held):
        raise ValueError("ranks hold rows of different names or shapes; every rank must record the same kind of call")
    out = {}
    for k in sorted(ref):
        trailing, dtype = ref[k][0][1:], getattr(torch, ref[k][1])
        wire = torch.uint8 if dtype == torch.bool else dtype   # Gloo and NCCL move bytes, not bools
        counts = [m[k][0][0] if m is not None else 0 for m in seen]
        buf = torch.zeros((max(counts), *trailing), dtype=wire, device=_comm_device())
        if tensors is not None:
            buf[:counts[world()[0]]] = tensors[k].to(buf.device, wire)
        parts = [torch.empty_like(buf) for _ in range(size)]
        torch.distributed.all_gather(parts, buf)
        out[k] = torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu().to(dtype)
    return out


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def check_same(value: str, what: str, fix: str | None = None) -> None:
    """Refuse to go on when ranks disagree on ``value`` (a recipe, a model fingerprint): compared by hash. ``fix``:
    what to do instead of the default "every rank must run the same <what>"."""
    if not active() or world()[1] == 1:
        return
    digest = hashlib.sha256(value.encode()).hexdigest()[:16]
    seen: list = [None] * world()[1]
    torch.distributed.all_gather_object(seen, digest)
    if len(set(seen)) > 1:
        odd = [r for r, d in enumerate(seen) if d != seen[0]]
        raise ValueError(f"ranks differ in their {what} (rank 0 vs rank{'s' if len(odd) > 1 else ''} "
                         f"{', '.join(map(str, odd))}); {fix or f'every rank must run the same {what}'}")
