"""How much memory is free, and a one-line refusal for work that cannot fit in it."""
from __future__ import annotations

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


def check_fits(n_bytes: float, what: str, setting: str) -> None:
    """Refuse, naming ``setting``, work whose arrays alone would take more than the free memory."""
    free = available_bytes()
    if n_bytes > free:
        raise ValueError(f"{setting}: {what} would need {n_bytes / 2**30:.1f} GiB, more than the "
                         f"{free / 2**30:.1f} GiB of free memory; lower {setting}")
