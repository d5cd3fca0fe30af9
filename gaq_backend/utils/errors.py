"""One-line error text: what gaq puts after ``gaq: error:``, and third-party log lines held back on error paths."""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator


def one_line(e: BaseException, limit: int | None = None) -> str:
    """``e``'s message on one line (whitespace collapsed), cut at ``limit`` characters; its type if empty."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:limit] if limit else text


LIBRARY_LOGGERS = ("diffusers", "transformers")


@contextlib.contextmanager
def library_logs_as_warnings(libraries: tuple[str, ...] = ("diffusers",)) -> Iterator[None]:
    """Hold diffusers' and transformers' log lines while the block runs (loading a model logs, e.g., "An error
    occurred while trying to fetch ..." before raising). If the block fails, gaq's one-line error says what
    happened and the held lines are dropped; if it succeeds, each is shown as one ``gaq: warning:`` line.
    ``libraries``: those the block may import first; their logging is set up now, since a library adds its
    stderr handler when it is first imported."""
    import importlib
    import importlib.util

    for name in set(libraries) | {n for n in LIBRARY_LOGGERS if n in sys.modules}:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(f"{name}.utils.logging")
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [Hold(logging.WARNING)], False
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
    for record in held:  # reached only on success
        print(f"gaq: warning: {record.name.split('.')[0]}: {one_line(Exception(record.getMessage()), 300)}", file=sys.stderr)
