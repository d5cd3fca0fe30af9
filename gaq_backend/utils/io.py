"""The one output writer: atomic files and folders that never replace what gaq did not write.

- ``output_dir(path, kind)`` builds a folder under a temporary name and moves it into place at the end.
  An existing folder is written into only if its manifest (``gaq-manifest.json``, written last) says
  it is a gaq output of the same kind, or with ``overwrite=True``; even then only the files gaq writes
  are replaced, and the previous output's files that the new one no longer has are removed. The working
  directory, its ancestors, the home folder and any folder the caller protects (the recipe's, the
  model's, the cache) are refused outright.
- ``output_file(path)`` does the same for one file: an existing file is replaced only if ``owned(path)``
  recognises it as gaq's, or with ``overwrite=True``.
- Temporary names carry the writer's pid (``.tmp-gaq-<pid>-...``), so the next run removes the ones a
  killed run left behind (``clean_stale_tmp``) and never touches a live writer's; they are never longer
  than the final name.
- Every path is checked before the work (``_check_parent``: no broken link or loop above it, names that fit),
  a write the environment fails (disk full, size limit, read-only) is one ``OutputError`` naming the output
  (``write_faults_as_errors``), and every file gets the mode the umask gives.
- ``check_distinct``: one command's outputs are different files and none is one of its inputs;
  ``output_file_in``: a file added to a gaq output folder (``gaq eval``'s) through its manifest.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Iterator

from .errors import one_line
from .inputs import what_is_wrong

MANIFEST = "gaq-manifest.json"
TMP_PREFIX = ".tmp-gaq-"


class OutputError(ValueError):
    """An output path gaq may not write; the message names the path and what to do."""


def umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


TMP_RANDOM = 8  # the characters tempfile adds after the prefix
TMP_MIN_NAME = 48


def tmp_prefix(name: str) -> str:
    """``.tmp-gaq-<host>.<pid>-<name>-``: whose temporary this is, so only a dead writer's is ever removed
    (the host tag keeps a cache shared between machines safe: another machine's pids are not checked here).
    ``name`` is cut so that the temporary name (with tempfile's random part) is never longer than the final
    name, or 48 characters for a short one: a final name that fits the filesystem has a temporary that fits."""
    head = f"{TMP_PREFIX}{_host_tag()}.{os.getpid()}-"
    room = max(len(name), TMP_MIN_NAME) - len(head) - 1 - TMP_RANDOM
    return f"{head}{name[:max(room, 0)]}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale_tmp(folder: str) -> list[str]:
    """Remove ``.tmp-gaq-<pid>-*`` entries in ``folder`` whose writer is no longer running; returns them."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(TMP_PREFIX):
            continue
        host, _, pid = name[len(TMP_PREFIX):].split("-", 1)[0].partition(".")
        if host != _host_tag() or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        removed.append(path)
    return removed


def _name_max(folder: str) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_parent(path: str, flag: str) -> str:
    """``path`` can be created: its nearest existing ancestor is a writable folder (not a file, a broken symbolic
    link or a link loop) and every name still to be made fits the filesystem. Checked before the work, written nothing."""
    path = os.path.abspath(path)
    parent, to_make = os.path.dirname(path), [os.path.basename(path)]
    while parent and not os.path.exists(parent):
        if os.path.lexists(parent):  # a link that leads nowhere: makedirs would fail only at the final write
            raise OutputError(f"{flag} {path}: {parent} {what_is_wrong(parent)}")
        parent, to_make = os.path.dirname(parent), [os.path.basename(parent), *to_make]
    if parent and not os.path.isdir(parent):
        raise OutputError(f"{flag} {path}: {parent} is a file, not a folder")
    if parent and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: no permission to write in {parent}")
    limit = _name_max(parent or ".")
    long = [n for n in to_make if len(os.fsencode(n)) > limit]
    if long:
        raise OutputError(f"{flag} {path}: the name {long[0][:40]}... is longer than the filesystem allows ({limit} bytes)")
    return parent


WRITE_FAULTS = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is larger than allowed", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the filesystem is read-only", errno.EIO: "an I/O error"}


def write_fault(e: BaseException) -> str | None:
    """What went wrong if ``e`` is the environment failing a write (a full disk, a size limit, a read-only or failing
    disk), else None. safetensors (its own error type) and shutil.copytree (an OSError holding a list) report these
    with the OS error code in the message."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None and (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"):
        import re

        m = re.search(r"(?:code: |os error |\[Errno )(\d+)", str(e))
        code = int(m.group(1)) if m else None
    return WRITE_FAULTS.get(code) if code is not None else None


@contextlib.contextmanager
def write_faults_as_errors(path: str) -> Iterator[None]:
    """A write that the environment fails is the user's to fix: one ``OutputError`` naming the output."""
    try:
        yield
    except Exception as e:
        reason = write_fault(e)
        if reason is None:
            raise
        raise OutputError(f"cannot write {path}: {reason} ({one_line(e, 100)}); nothing was written there") from e


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    Callers that may meet a file gaq did not write check with :func:`check_output_file` first."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise OutputError(f"{path} is a folder; expected a file path")
    _check_parent(path, "output")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    clean_stale_tmp(parent)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(os.path.basename(path)), dir=parent)
    os.close(fd)
    try:
        with write_faults_as_errors(path):
            yield tmp
            os.chmod(tmp, umask_mode(0o666))
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_manifest(folder: str) -> dict | None:
    """The manifest of a gaq output folder, or None if it has none (or an unreadable one)."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and isinstance(m.get("kind"), str) and isinstance(m.get("files"), list)
    return m if ok else None


def _protected(extra: Iterable[str]) -> list[tuple[str, str]]:
    return [(os.path.realpath(os.getcwd()), "the working directory"), (os.path.realpath(os.path.expanduser("~")), "the home folder"),
            *((os.path.realpath(p), "an input of this run (model, cache or recipe folder)") for p in extra if p)]


def _owned_files(folder: str) -> set[str]:
    m = read_manifest(folder)
    return {f for f in (m or {}).get("files", []) if isinstance(f, str) and os.sep not in f and f not in (MANIFEST, ".", "..")}


def _check_clash(folder: str, files: Iterable[str], flag: str) -> None:
    """gaq replaces only files it wrote: a same-named file of the user's, or a folder, stops the write."""
    owned = _owned_files(folder)
    clash = sorted(f for f in files if os.path.lexists(os.path.join(folder, f)) and (f not in owned or not os.path.isfile(os.path.join(folder, f))))
    if clash:
        raise OutputError(f"{flag} {folder} holds {', '.join(clash[:3])} that gaq did not write and will not replace; "
                          "move them or name another folder")


def check_output_dir(path: str, kind: str, overwrite: bool = False, protect: Iterable[str] = (), flag: str = "--out",
                     files: Iterable[str] = ()) -> str:
    """Raise :class:`OutputError` unless gaq may write a ``kind`` output folder at ``path``; returns it absolute.
    ``files``: the names the output will have, as far as known before the work (checked for clashes)."""
    if not path or not str(path).strip():
        raise OutputError(f"{flag} is empty; name a new folder")
    path = os.path.abspath(os.path.expanduser(path))
    real = os.path.realpath(path)
    for p, what in _protected(protect):
        if real == p or p.startswith(real.rstrip(os.sep) + os.sep):
            where = "is" if real == p else f"contains {p},"
            raise OutputError(f"{flag} {path} {where} {what}, which gaq never writes over; name a new folder")
    _check_parent(path, flag)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            what = what_is_wrong(path) or "is a file; expected a folder"
            raise OutputError(f"{flag} {path} {what} (choose another path)")
        m = read_manifest(path)
        if m is not None and m["kind"] != kind:
            raise OutputError(f"{flag} {path} is a gaq {m['kind']} output, not a {kind} output; name another folder")
        if m is None and os.listdir(path) and not overwrite:
            raise OutputError(f"{flag} {path} exists and was not written by gaq; name a new folder, or pass --overwrite "
                              "to add gaq's files to it (only those are replaced)")
        _check_clash(path, files, flag)
    return path


def _write_manifest(folder: str, kind: str, files: list[str], complete: bool) -> None:
    from .. import __version__

    write_json(os.path.join(folder, MANIFEST), dict(kind=kind, complete=complete, files=sorted(files), gaq=__version__))


def _commit(tmp: str, target: str, kind: str) -> None:
    files = sorted(os.listdir(tmp))
    if any(os.path.isdir(os.path.join(tmp, f)) for f in files):
        raise RuntimeError(f"output folders hold files only; got a folder in {files}")
    for f in files:  # libraries create some files 0600 (safetensors, onnx's external data): the umask decides
        os.chmod(os.path.join(tmp, f), umask_mode(0o666))
    if not os.path.lexists(target):
        _write_manifest(tmp, kind, files, complete=True)
        os.chmod(tmp, umask_mode(0o777))
        os.replace(tmp, target)
        return
    _check_clash(target, files, "output")
    old_files = _owned_files(target)
    # while files move in, the manifest says "incomplete": readers refuse the folder, a rerun may replace it
    _write_manifest(target, kind, sorted(set(files) | set(old_files)), complete=False)
    for f in files:
        os.replace(os.path.join(tmp, f), os.path.join(target, f))
    for f in set(old_files) - set(files):
        if os.path.isfile(os.path.join(target, f)):
            os.remove(os.path.join(target, f))
    _write_manifest(target, kind, files, complete=True)


@contextlib.contextmanager
def output_dir(path: str, kind: str, overwrite: bool = False, protect: Iterable[str] = (), files: Iterable[str] = ()) -> Iterator[str]:
    """Yield a temporary folder to fill; on success its files replace gaq's files at ``path``.

    On failure or interrupt before the files move in, nothing at ``path`` changes; an interrupt while
    they move in leaves the folder marked incomplete (readers refuse it, a rerun replaces it). The checks
    of :func:`check_output_dir` run again here, so a folder that appeared while the work ran is not
    replaced either."""
    target = check_output_dir(path, kind, overwrite, protect, files=files)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    clean_stale_tmp(parent)
    tmp = tempfile.mkdtemp(prefix=tmp_prefix(os.path.basename(target)), dir=parent)
    try:
        with write_faults_as_errors(target):
            yield tmp
            check_output_dir(target, kind, overwrite, protect)
            _commit(tmp, target, kind)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def add_to_output(folder: str, files: list[str]) -> None:
    """Record files written later into a gaq output folder (e.g. ``gaq eval``'s) in its manifest."""
    m = read_manifest(folder)
    if m is not None:
        _write_manifest(folder, m["kind"], sorted(_owned_files(folder) | set(files)), complete=m.get("complete", False) is True)


def check_output_file(path: str, overwrite: bool = False, owned: Callable[[str], bool] | None = None, flag: str = "--out") -> str:
    """Raise :class:`OutputError` unless gaq may write the file ``path``; returns it absolute."""
    if not path or not str(path).strip():
        raise OutputError(f"{flag} is empty; name a file")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise OutputError(f"{flag} {path} is a folder; expected a file path")
    _check_parent(path, flag)
    if os.path.lexists(path) and not overwrite and not (owned and owned(path)):
        raise OutputError(f"{flag} {path} exists and was not written by gaq; choose another path, or pass --overwrite to replace it")
    return path


def check_distinct(outputs: dict[str, str], inputs: dict[str, str] = {}) -> None:  # noqa: B006 - read only
    """One command's outputs (flag -> path) are different files, and none is one of its inputs: a file named twice
    would be written twice, and the report would name two files where one is left."""
    seen: dict[str, str] = {}
    for flag, path in inputs.items():
        if path:
            seen.setdefault(os.path.realpath(path), flag)
    for flag, path in outputs.items():
        if not path:
            continue
        real = os.path.realpath(path)
        if real in seen:
            what = "input" if seen[real] in inputs else "output"
            raise OutputError(f"{flag} {path} is also the {what} {seen[real]}; name different files")
        seen[real] = flag


def check_files_in_output(folder: str, files: Iterable[str], flag: str = "DIR") -> str:
    """gaq may add ``files`` to the gaq output ``folder``: it has a manifest, and each file is new or one gaq
    wrote there before (its manifest lists it). Returns the folder, absolute."""
    folder = os.path.abspath(folder)
    if read_manifest(folder) is None:
        raise OutputError(f"{flag} {folder} is not an output folder of gaq (no readable {MANIFEST}); gaq writes only into its own folders")
    _check_clash(folder, files, flag)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {folder}: no permission to write in it")
    return folder


@contextlib.contextmanager
def output_file_in(folder: str, name: str) -> Iterator[str]:
    """Yield a temporary path for the file ``name`` that gaq adds to its output ``folder`` (see
    :func:`check_files_in_output`); the manifest claims the name before the file moves in, so a kill in between
    leaves a name gaq may replace later, never a file of gaq's that looks like the user's."""
    check_files_in_output(folder, [name])
    add_to_output(folder, [name])
    with atomic_path(os.path.join(folder, name)) as tmp:
        yield tmp


def write_json(path: str, obj: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
