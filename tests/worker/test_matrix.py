"""The bad-adapter matrix through the whole data path (resolve -> prefetch -> validate), one test per case,
each beside a good adapter that is being served from the same cache and stays cached, pinned and valid."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import adapters, servers

from loraplane.errors import LoraplaneError, ValidationFailed
from loraplane.worker import cache as c
from loraplane.worker import sources as s
from loraplane.worker import validate as v
from loraplane.worker.inference import basemodel as bm
from loraplane.worker.inference import peft as a
from loraplane.worker.prefetch import Prefetcher

MAX_RANK = 16


@dataclass
class Worker:
    """The worker's data path as the controller drives it, with one good adapter being served."""

    root: Path
    settings: s.SourceSettings
    cache: Prefetcher
    base: bm.ModelConfig
    good: c.CacheEntry

    def run(
        self,
        path: str,
        *,
        settings: s.SourceSettings | None = None,
        between: Callable[[], None] = lambda: None,
    ) -> v.AdapterSummary:
        resolved = s.resolve(path, None, settings or self.settings)
        between()
        entry = self.cache.prefetch(resolved)
        return v.validate_adapter(entry.path, self.base, max_lora_rank=MAX_RANK, sha256=entry.sha256())

    def good_is_intact(self) -> None:
        assert self.cache.index.lookup(self.good.cache_key) == self.good and self.cache.index.is_pinned(
            self.good.cache_key
        )
        v.validate_adapter(self.good.path, self.base, max_lora_rank=MAX_RANK)


@pytest.fixture
def worker(tmp_path: Path) -> Worker:
    root = tmp_path / "adapters"
    settings = s.SourceSettings(local_roots=(root,), timeout_s=2)
    base = bm.ModelConfig.from_dir(adapters.write_base_config(tmp_path / "base"))
    cache = Prefetcher(
        c.CacheIndex(tmp_path / "cache", 2 << 20), retries=1, backoff_s=0.01, sources_settings=settings
    )
    good = s.resolve(str(adapters.write_adapter(root / "good")), None, settings)
    entry = cache.prefetch(good, pin=True)
    return Worker(root, settings, cache, base, entry)


def _truncate(d: Path) -> None:
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:200])


def _huge_header(d: Path) -> None:
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")


def _bin_only(d: Path) -> None:
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")


# (id, write_adapter keywords, then-change-the-files, expected reason, message fragment)
FILE_CASES: list[tuple[str, dict[str, Any], Callable[[Path], None] | None, str, str]] = [
    ("wrong-hidden-size", {"base": {"hidden_size": 96}}, None, a.SHAPE_MISMATCH, "hidden_size 64"),
    ("rank-above-maximum", {"r": 32}, None, a.RANK_TOO_LARGE, "maxLoraRank 16"),
    ("unknown-target-module", {"target_modules": ("q_proj", "qkv_proj")}, None, a.UNKNOWN_TARGET_MODULE, "'qkv_proj'"),
    ("dora", {"config": {"use_dora": True}}, None, a.DORA_NOT_SUPPORTED, "DoRA"),
    ("bias", {"config": {"bias": "all"}}, None, a.BIAS_NOT_SUPPORTED, "bias='all'"),
    ("truncated-safetensors", {}, _truncate, a.TRUNCATED_WEIGHTS, "adapter_model.safetensors"),
    ("enormous-header", {}, _huge_header, a.HEADER_TOO_LARGE, "adapter_model.safetensors declares"),
    ("pickle-bin", {}, _bin_only, a.PICKLE_REFUSED, "adapter_model.bin"),
    ("missing-file", {}, lambda d: (d / "adapter_config.json").unlink(), bm.FILE_MISSING, "adapter_config.json"),
    ("too-large-for-the-cache", {"extra_tensors": {"pad.lora_A.weight": (600_000,)}}, None, bm.TOO_LARGE, "cache budget"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kw", "change", "reason", "fragment"), [x[1:] for x in FILE_CASES], ids=[x[0] for x in FILE_CASES]
)
def test_bad_adapter_files(worker: Worker, kw, change, reason, fragment) -> None:
    d = adapters.write_adapter(worker.root / "bad", **kw)
    if change is not None:
        change(d)
    with pytest.raises(LoraplaneError) as e:
        worker.run(str(d))
    reasons = [r for r, _ in e.value.problems] if isinstance(e.value, ValidationFailed) else [e.value.reason]
    assert reason in reasons and fragment in e.value.message, e.value
    worker.good_is_intact()


def test_path_traversal(worker: Worker) -> None:
    with pytest.raises(LoraplaneError) as e:
        worker.run(f"{worker.root}/../etc")
    assert e.value.reason == s.PATH_NOT_ALLOWED and "'..'" in e.value.message
    worker.good_is_intact()


def test_symlink_escape(worker: Worker, tmp_path: Path) -> None:
    (worker.root / "escape").symlink_to(
        adapters.write_adapter(tmp_path / "outside"), target_is_directory=True
    )
    with pytest.raises(LoraplaneError) as e:
        worker.run(str(worker.root / "escape"))
    assert e.value.reason == s.SYMLINK_ESCAPE and "outside the root" in e.value.message
    worker.good_is_intact()


@pytest.mark.parametrize("kind", ["s3", "hf"])
def test_unreachable_endpoint(worker: Worker, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    url = servers.closed_url()
    settings = s.SourceSettings(s3_endpoint_url=url, hf_endpoint=url, timeout_s=2)
    with pytest.raises(LoraplaneError) as e:
        worker.run("s3://bucket/a" if kind == "s3" else "team/a", settings=settings)
    assert (
        e.value.reason == s.SOURCE_UNREACHABLE and e.value.retry and url.rsplit(":", 1)[1] in e.value.message
    )
    worker.good_is_intact()


def test_source_that_disappears_after_registration(worker: Worker) -> None:
    d = adapters.write_adapter(worker.root / "gone")
    with pytest.raises(LoraplaneError) as e:
        worker.run(str(d), between=lambda: (d / "adapter_model.safetensors").unlink())
    assert e.value.reason == bm.FILE_MISSING and "disappeared after it was resolved" in e.value.message
    worker.good_is_intact()


def test_a_good_second_adapter_becomes_valid_beside_the_first(worker: Worker) -> None:
    summary = worker.run(str(adapters.write_adapter(worker.root / "second", r=4, seed=3)))
    assert summary.rank == 4
    worker.good_is_intact()
