"""Content-addressed cache of finished work, so that a re-run redoes nothing it has done.

Keys are sha256 digests of (step config, input rows, model id); values are frames (step
outputs and parsed sources: Arrow IPC files, or parquet where Arrow cannot hold a frame's
types), JSON (step reports) or journals (LLM replies). Every frame or JSON write goes to a
temporary file first and is renamed into place, so a crash never leaves a half-written
entry that a later run would trust. A journal is appended to one reply at a
time, as replies arrive, and a line cut short by a crash is skipped when it is read back.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import polars as pl

from .encoding import json_encoder
from .files import write_atomic


def frame_digest(frame: pl.DataFrame) -> str:
    """A digest of a frame's schema and rows.

    Hashes the Arrow IPC bytes at the oldest compatibility level: that converts polars'
    string views to plain offsets and data, so the bytes depend on the content only, not
    on how the buffers were built (a sliced batch and the same rows read back from
    parquet hash alike).
    """
    import hashlib

    sink = io.BytesIO()
    frame.rechunk().write_ipc(sink, compression="uncompressed", compat_level=pl.CompatLevel.oldest())
    return hashlib.sha256(sink.getbuffer()).hexdigest()  # the bytes where they are, not a copy


def _arrow_table(frame: pl.DataFrame):
    """``frame`` as an Arrow table, or None when polars would not read it back with its schema."""
    try:
        table = frame.to_arrow(compat_level=pl.CompatLevel.newest())  # string views: read back without a copy
        return table if pl.from_arrow(table).schema == frame.schema else None
    except Exception:  # a type Arrow has no counterpart for (Int128...)
        return None


def _write_arrow(path: Path, table) -> None:
    import pyarrow as pa
    import pyarrow.ipc

    options = pa.ipc.IpcWriteOptions(compression="lz4" if pa.Codec.is_available("lz4_frame") else None)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)


def _read_arrow(path: Path) -> pl.DataFrame:
    import pyarrow as pa
    import pyarrow.ipc

    # Read whole, in this thread: a batch's file is small, and pyarrow's threads cost more than they save.
    data = pa.py_buffer(path.read_bytes())
    return pl.from_arrow(pa.ipc.open_file(data, options=pa.ipc.IpcReadOptions(use_threads=False)).read_all())


class Cache:
    """Files under ``root/<namespace>/<key[:2]>/<key>.<ext>``.

    Attributes:
        keep_each_reply: LLM replies are journaled per round of requests; while this is set (a
            preview, the passes of a run to ``output.rows``), each is also kept under its own key
            (:meth:`put_reply`), so that a later round of other rows -- the full run's first batch
            after a preview's five rows -- finds it (:meth:`get_reply`).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.keep_each_reply = False

    def get_reply(self, key: str):
        """A reply kept under its own key, or None (cheap when none was ever kept)."""
        return self.get_replies([key])[0]

    def get_replies(self, keys: list[str]) -> list:
        """:meth:`get_reply` of each key (the folder looked for once)."""
        if not keys or not (self.root / "replies").is_dir():
            return [None] * len(keys)
        return [self.get_json("replies", key) for key in keys]

    def put_reply(self, key: str, value) -> None:
        if self.keep_each_reply:
            self.put_json("replies", key, value)

    def _path(self, namespace: str, key: str, ext: str) -> Path:
        return self.root / namespace / key[:2] / f"{key}.{ext}"

    def get_frame(self, namespace: str, key: str) -> pl.DataFrame | None:
        for ext, read in (("arrow", _read_arrow), ("parquet", pl.read_parquet)):
            path = self._path(namespace, key, ext)
            if path.is_file():
                try:
                    return read(path)
                except Exception:  # a corrupt entry (disk full, foreign file) is a miss, not a crash
                    continue
        return None

    def put_frame(self, namespace: str, key: str, frame: pl.DataFrame) -> None:
        """Stores ``frame`` as an Arrow IPC file (LZ4), a few times faster to read back than
        parquet; as parquet (what every entry was before) when Arrow would not give it back
        with the same schema."""
        table = _arrow_table(frame)
        if table is not None:
            try:
                write_atomic(self._path(namespace, key, "arrow"), lambda tmp: _write_arrow(tmp, table))
                return
            except Exception:
                pass
        write_atomic(self._path(namespace, key, "parquet"), frame.write_parquet)

    def get_json(self, namespace: str, key: str):
        path = self._path(namespace, key, "json")
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put_json(self, namespace: str, key: str, value) -> None:
        write_atomic(self._path(namespace, key, "json"), json.dumps(value, ensure_ascii=False))

    def journal(self, namespace: str, key: str) -> "Journal":
        return Journal(self._path(namespace, key, "jsonl"))


_journal_text = json_encoder(ensure_ascii=False)


def _entry(key: str, value) -> bytes:
    """One journal line: ``json.dumps({"key": key, "value": value}, ensure_ascii=False)`` and a newline."""
    return _journal_text({"key": key, "value": value}).encode("utf-8") + b"\n"


class Journal:
    """Entries appended one line at a time (``{"key": ..., "value": ...}``), read back as a dict."""

    def __init__(self, path: Path | None):
        self.path = path
        self._file = None

    def read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        entries = {}
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    entries[entry["key"]] = entry["value"]
                except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                    continue
        return entries

    def append(self, key: str, value) -> None:
        self.extend([(key, value)])

    def extend(self, entries: list[tuple[str, Any]]) -> None:
        """Appends ``(key, value)`` entries, a line each, in one write."""
        if self.path is None or not entries:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab+")
            end = self._file.seek(0, os.SEEK_END)
            if end:  # after a crash mid-line, start on a line of its own
                self._file.seek(end - 1)
                if self._file.read(1) != b"\n":
                    self._file.write(b"\n")
        self._file.write(b"".join(_entry(key, value) for key, value in entries))

    def flush(self) -> None:
        """Hands what was appended to the operating system (it survives the process being killed)."""
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class NullCache(Cache):
    """A cache that stores nothing (``--no-cache``)."""

    def __init__(self):
        super().__init__(os.devnull)  # never written: every method below is a no-op

    def get_frame(self, namespace, key):
        return None

    def put_frame(self, namespace, key, frame):
        pass

    def get_json(self, namespace, key):
        return None

    def put_json(self, namespace, key, value):
        pass

    def journal(self, namespace, key):
        return Journal(None)
