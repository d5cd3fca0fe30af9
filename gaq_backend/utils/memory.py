"""How much memory is free, and a one-line refusal for work that cannot fit in it."""
from __future__ import annotations

import ctypes
import os


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_bytes(device) -> int:
    """Memory that can still be allocated on ``device`` (a torch.device): the GPU's free memory, or RAM."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    return available_bytes()


def release_free_memory() -> None:
    """Hand memory that torch has freed back to the OS (glibc only; elsewhere a no-op). glibc keeps what a thread
    frees in that thread's arena for reuse by the same thread; block reconstruction runs each paused forward pass
    in its own thread, so without this every pass would keep its largest transients resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_fits(n_bytes: float, what: str, setting: str) -> None:
    """Refuse, naming ``setting``, work whose arrays alone would take more than the free memory."""
    free = available_bytes()
    if n_bytes > free:
        raise ValueError(f"{setting}: {what} would need {n_bytes / 2**30:.1f} GiB, more than the "
                         f"{free / 2**30:.1f} GiB of free memory; lower {setting}")
