"""Writing a file atomically: into a temporary file beside it, then renamed over it.

A reader, or a run restarted after a crash, sees the old file or the new one, never half of
one: a cache entry, a training record or an evolve state cut short would be trusted as whole.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

TEMPORARY_PREFIX = ".tmp-"  # hidden, and never a name the factory reads


def write_atomic(path: str | Path, content: str | bytes | Callable[[Path], None]) -> Path:
    """Writes ``content`` to ``path`` through a temporary file in the same folder (a rename
    within one file system is atomic), creating the folder when needed.

    Args:
        path: the file to write (replaced when it exists).
        content: text (written as UTF-8), bytes, or a function that writes the temporary file
            whose path it is given (a parquet or Arrow writer).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name per call: two writers of one path (threads, processes) never share a temporary file.
    tmp = path.with_name(f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}{path.suffix}")
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            tmp.write_bytes(content)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C too: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise
    return path
