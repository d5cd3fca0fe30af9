"""The one cache reader and writer: every entry is validated when read, and a bad one heals itself.

An entry is a safetensors file of NumPy arrays whose metadata holds the cache format and a SHA-256 of
the arrays' bytes. Reading checks the header, the dtypes and shapes it declares, and the checksum; a
truncated, corrupted or foreign entry is reported in one warning line naming its path, removed, and
the caller recomputes it. Entries are written atomically, so a killed run leaves only a ``.tmp-gaq-``
file, which the next run removes (:func:`gaq_backend.utils.io.clean_stale_tmp`).
"""
from __future__ import annotations

import hashlib
import os
import sys

import numpy as np

from .errors import one_line
from .io import OutputError, atomic_path, clean_stale_tmp

FORMAT = "gaq-cache-1"


def prepare_cache_dir(path: str, key: str = "cache_dir") -> str:
    """Create the cache folder (a one-line error if ``path`` is empty or a file) and clear stale temporaries."""
    if not path or not str(path).strip():
        raise OutputError(f"{key} is empty; name a folder for gaq's cache")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{key} {path} is a file; expected a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{key} {path} cannot be created ({e.strerror})") from None
    clean_stale_tmp(path)
    return path


def _digest(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_entry(path: str, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    with atomic_path(path) as tmp:
        save_file(arrays, tmp, metadata={"format": FORMAT, "sha256": _digest(arrays)})


def read_entry(path: str) -> dict[str, np.ndarray] | None:
    """The arrays of a valid entry, or None if there is none (a bad entry is removed with a warning)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        return None
    if not os.path.isfile(path):  # not gaq's to remove: say so once, and stop
        raise OutputError(f"cache entry {path} is a folder, not a gaq cache file; move it out of the cache folder")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("sha256") != _digest(arrays):
            raise ValueError("checksum mismatch")
    except (MemoryError, PermissionError):
        raise  # not the entry's fault: keep it
    except Exception as e:  # safetensors raises its own error type for truncated or garbage files
        print(f"gaq: warning: cache entry {path} is unreadable ({one_line(e, 120)}); removing it and recomputing", file=sys.stderr)
        try:
            os.remove(path)
        except OSError:
            pass
        return None
    return arrays


def write_tensors(path: str, tensors: dict) -> None:
    """``write_entry`` for torch tensors; bfloat16 (which NumPy lacks) is stored as float32 and restored on read."""
    import torch

    arrays = {(f"{k}@bfloat16" if v.dtype == torch.bfloat16 else k): (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy()
              for k, v in tensors.items()}
    write_entry(path, arrays)


def read_tensors(path: str) -> dict | None:
    import torch

    arrays = read_entry(path)
    if arrays is None:
        return None
    out = {}
    for k, v in arrays.items():
        name, _, dtype = k.partition("@")
        out[name] = torch.from_numpy(v).to(torch.bfloat16) if dtype == "bfloat16" else torch.from_numpy(v)
    return out
