"""The one input checker: every path gaq reads is checked, and every file parsed, through here.

- ``check_input(path, flag, want)`` runs before any work: the path exists, is the kind of thing wanted
  (a file or a folder), is not a broken symbolic link or a link loop, and can be read. Each failure is
  one line naming the flag, the path and what is wrong with it.
- ``reading(path, what)`` wraps the parse of one file: whatever a library raises for a truncated, empty,
  foreign or wrong-shape file (``struct.error``, ``BadZipFile``, ``KeyError``, safetensors' own error
  type, ...) becomes one :class:`InputError` naming the file, what it should have been, and why not.

Nothing gaq reads is unpickled: weights, checkpoints and caches are safetensors, arrays are read with
``allow_pickle=False`` (``tests/test_reliability_faults.py`` plants a pickle payload for every reader and scans the
source for loaders that could unpickle).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from typing import Iterator

from .errors import one_line


class InputError(ValueError):
    """An input gaq cannot use; the message names the file or flag and what is wrong with it."""


def what_is_wrong(path: str) -> str | None:
    """Why ``path`` cannot be opened at all, or None if it can be stat'ed."""
    try:
        os.stat(path)
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)})"
        if e.errno == errno.ENOTDIR:
            return "does not exist (a part of the path is a file, not a folder)"
        if e.errno == errno.ENAMETOOLONG:
            return "is a name longer than the filesystem allows"
        if e.errno == errno.ENOENT:
            return "does not exist"
        return e.strerror or str(e)


def check_input(path: str, flag: str, want: str = "file") -> str:
    """``path`` (an input named by ``flag``) as an absolute path, or a one-line :class:`InputError`.
    ``want``: ``"file"``, ``"folder"`` or ``"any"``."""
    if path is None or not str(path).strip():
        raise InputError(f"{flag} is empty; name a {'folder' if want == 'folder' else 'file'}")
    label = f"{flag} {path}" if flag else str(path)
    wrong = what_is_wrong(path)
    if wrong:
        raise InputError(f"{label} {wrong}")
    if want == "folder" and not os.path.isdir(path):
        raise InputError(f"{label} is a file; expected a folder")
    if want == "file" and os.path.isdir(path):
        raise InputError(f"{label} is a folder; expected a file")
    if want == "file" and not os.path.isfile(path):
        raise InputError(f"{label} is not a regular file")
    if not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
        raise InputError(f"{label}: no permission to read it")
    return os.path.abspath(path)


@contextlib.contextmanager
def reading(path: str, what: str) -> Iterator[None]:
    """Turn any failure of the parse inside the block into one ``InputError``: "PATH: not a readable WHAT (why)".

    gaq's own one-line errors and an out-of-memory pass through unchanged; the cause stays chained for ``--debug``."""
    try:
        yield
    except (InputError, MemoryError):
        raise
    except PermissionError as e:
        raise InputError(f"{path}: no permission to read it") from e
    except Exception as e:  # libraries raise many types for a bad file: struct.error, BadZipFile, KeyError, ...
        raise InputError(f"{path}: not a readable {what} ({type(e).__name__}: {one_line(e, 160)})") from e


def read_json_object(path: str) -> dict:
    """A JSON object from ``path``; a one-line :class:`InputError` naming the file if it is not one."""
    with reading(path, "JSON file"):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    if not isinstance(d, dict):
        raise InputError(f"{path}: expected a JSON object, got a {type(d).__name__}")
    return d
