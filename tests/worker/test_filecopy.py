"""The local fast path: kernel copy with the hash of the written bytes computed alongside."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from loraplane.worker import sources as s
from loraplane.worker.sources import filecopy


@pytest.mark.parametrize("size", [0, 1, 4096, filecopy.STEP + 123])
def test_copy_and_hash_matches_the_source(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    (tmp_path / "src").write_bytes(data)
    seen: list[int] = []
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "w+b") as dst:
        n, digest = filecopy.copy_and_hash(
            src.fileno(), dst.fileno(), size, progress=lambda d, _t: seen.append(d)
        )
    assert n == size and digest == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "dst").read_bytes() == data
    assert seen == sorted(seen) and (not size or seen[-1] == size)


def test_a_shorter_source_gives_fewer_bytes(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"x" * 100)
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "w+b") as dst:
        n, _ = filecopy.copy_and_hash(src.fileno(), dst.fileno(), 1000)
    assert n == 100


def test_fast_and_streamed_paths_agree(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "a").mkdir(parents=True)
    (root / "a" / "adapter_config.json").write_text("{}")
    (root / "a" / "adapter_model.safetensors").write_bytes(os.urandom(100_000))
    settings = s.SourceSettings(local_roots=(root,))
    r = s.resolve(str(root / "a"), None, settings)
    buf = io.BytesIO()
    streamed = s.fetch_file(r, "adapter_model.safetensors", buf, settings)
    with open(tmp_path / "out", "w+b") as out:
        fast = s.fetch_file(r, "adapter_model.safetensors", out, settings)
    assert streamed == fast and (tmp_path / "out").read_bytes() == buf.getvalue()


def test_fast_path_notices_a_source_rewritten_since_resolving(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "a").mkdir(parents=True)
    (root / "a" / "adapter_config.json").write_text("{}")
    w = root / "a" / "adapter_model.safetensors"
    w.write_bytes(b"a" * 1000)
    settings = s.SourceSettings(local_roots=(root,))
    r = s.resolve(str(root / "a"), None, settings)
    w.write_bytes(b"b" * 1001)
    with open(tmp_path / "out", "w+b") as out, pytest.raises(s.SourceError) as e:
        s.fetch_file(r, "adapter_model.safetensors", out, settings)
    assert e.value.reason == s.SOURCE_CHANGED and e.value.retry
