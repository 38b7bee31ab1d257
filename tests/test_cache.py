"""The cache's frames: Arrow IPC where it holds the frame's types, parquet otherwise and before."""

from __future__ import annotations

import polars as pl

from factory.cache import Cache


def test_frames_come_back_equal_in_either_format(tmp_path):
    cache = Cache(tmp_path)
    frame = pl.DataFrame({"text": ["a", None, "ü"], "n": [1, 2, None],
                          "messages": [[{"role": "user", "content": "hi"}], [], None]})
    cache.put_frame("steps", "k1", frame)
    assert cache._path("steps", "k1", "arrow").is_file() and cache.get_frame("steps", "k1").equals(frame)
    wide = pl.DataFrame({"big": pl.Series([1, 2], dtype=pl.Int128)})  # no Arrow type polars reads back the same
    cache.put_frame("steps", "k2", wide)
    assert cache._path("steps", "k2", "parquet").is_file()
    back = cache.get_frame("steps", "k2")
    assert back.schema == wide.schema and back.equals(wide)
    # An entry written as parquet by an earlier version is still a hit.
    old = cache._path("steps", "k3", "parquet")
    old.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(old)
    assert cache.get_frame("steps", "k3").equals(frame)
    assert cache.get_frame("steps", "missing") is None
