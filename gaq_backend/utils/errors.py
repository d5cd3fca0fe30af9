"""One-line error text: what gaq puts after ``gaq: error:``."""
from __future__ import annotations


def one_line(e: BaseException, limit: int | None = None) -> str:
    """``e``'s message on one line (whitespace collapsed), cut at ``limit`` characters; its type if empty."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:limit] if limit else text
