"""Hugging Face Hub sources with the real huggingface_hub client against a local Hub-compatible endpoint."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import adapters, servers

from loraplane.errors import LoraplaneError
from loraplane.worker import cache as c
from loraplane.worker import sources as s
from loraplane.worker.inference import peft as a
from loraplane.worker.prefetch import Prefetcher

hf_hub = servers.hf_hub
REPO = "team-a/sql-lora"


@pytest.fixture(autouse=True)
def _online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture
def repo(tmp_path: Path, hf_hub: Any) -> tuple[Any, str, Path]:
    """A repo whose main branch holds an adapter plus files that must never be fetched."""
    d = adapters.write_adapter(tmp_path / "a")
    files = {p.name: p for p in d.iterdir()}
    files.update(
        {"README.md": b"# sql", "training_args.bin": b"\x80\x04K\x01.", "big.safetensors": b"x" * 4096}
    )
    sha = hf_hub.add_commit(REPO, files)
    return hf_hub, sha, d


def _settings(hub: Any, tmp_path: Path, **kw: Any) -> s.SourceSettings:
    return s.SourceSettings(hf_endpoint=hub.url, timeout_s=5, state_dir=tmp_path / "state", **kw)


@pytest.mark.parametrize("path", [REPO, f"hf://{REPO}"])
def test_resolve_main_to_its_commit(tmp_path: Path, repo: tuple[Any, str, Path], path: str) -> None:
    hub, sha, d = repo
    r = s.resolve(path, None, _settings(hub, tmp_path))
    assert (r.kind, r.uri, r.resolved_revision) == ("hf", f"hf://{REPO}", sha)
    weights = r.file("adapter_model.safetensors")
    assert weights.sha256 == hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert [f.name for f in r.files] == list(a.ADAPTER_FILES)


def test_prefetch_fetches_only_the_adapter_files(tmp_path: Path, repo: tuple[Any, str, Path]) -> None:
    hub, sha, d = repo
    settings = _settings(hub, tmp_path)
    r = s.resolve(REPO, None, settings)
    entry = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings).prefetch(r)
    for name in a.ADAPTER_FILES:
        assert (entry.path / name).read_bytes() == (d / name).read_bytes()
    assert sorted(hub.file_gets()) == sorted(f"/{REPO}/resolve/{sha}/{n}" for n in a.ADAPTER_FILES)


def test_pinned_revisions_resolve_to_their_commit(tmp_path: Path, hf_hub: Any) -> None:
    v1 = hf_hub.add_commit(REPO, adapters.write_adapter(tmp_path / "v1", seed=1), tags=("v1",))
    v2 = hf_hub.add_commit(REPO, adapters.write_adapter(tmp_path / "v2", seed=2))
    settings = _settings(hf_hub, tmp_path)
    by_sha = s.resolve(REPO, v1, settings)
    assert by_sha.resolved_revision == v1 and by_sha.requested_revision == v1
    assert s.resolve(REPO, "v1", settings).resolved_revision == v1
    main = s.resolve(REPO, "main", settings)
    assert main.resolved_revision == v2 and main.cache_key != by_sha.cache_key
    entry = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings).prefetch(by_sha)
    assert (entry.path / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "v1" / "adapter_model.safetensors"
    ).read_bytes()


def test_token_from_the_environment_is_sent_and_never_logged(
    tmp_path: Path,
    repo: tuple[Any, str, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub, _, _ = repo
    hub.token = "hf_s3cr3t_token_value"
    settings = _settings(hub, tmp_path)
    with pytest.raises(s.SourceError) as e:
        s.resolve(REPO, None, settings)
    assert e.value.reason == s.SOURCE_FORBIDDEN and "HF_TOKEN" in e.value.message
    monkeypatch.setenv("HF_TOKEN", hub.token)
    caplog.set_level(logging.DEBUG)
    for name in ("huggingface_hub", "httpx", "httpcore"):  # their own levels too: everything at DEBUG
        caplog.set_level(logging.DEBUG, logger=name)
    r = s.resolve(REPO, None, settings)
    Prefetcher(
        c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings, progress_log_bytes=0
    ).prefetch(r)
    assert all(authorized for _, _, authorized in hub.requests[1:])
    assert hub.token not in caplog.text and hub.token not in repr(r)


def test_token_from_settings(tmp_path: Path, repo: tuple[Any, str, Path]) -> None:
    hub, sha, _ = repo
    hub.token = "hf_other"
    assert s.resolve(REPO, None, _settings(hub, tmp_path, hf_token="hf_other")).resolved_revision == sha


# (id, repo, revision, reason, fragment)
ERROR_CASES = [
    ("repo-not-found", "team-a/nope", None, s.SOURCE_NOT_FOUND, "repository not found"),
    ("revision-not-found", REPO, "no-such-branch", s.REVISION_NOT_FOUND, "no-such-branch"),
]


@pytest.mark.parametrize(
    ("name", "rev", "reason", "fragment"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_named_failures(tmp_path: Path, repo: tuple[Any, str, Path], name, rev, reason, fragment) -> None:
    hub, _, _ = repo
    with pytest.raises(s.SourceError) as e:
        s.resolve(name, rev, _settings(hub, tmp_path))
    assert e.value.reason == reason and fragment in e.value.message and not e.value.retry


def test_pickle_only_repo_is_refused(tmp_path: Path, hf_hub: Any) -> None:
    hf_hub.add_commit(REPO, {"adapter_config.json": b"{}", "adapter_model.bin": b"\x80\x04K\x01."})
    with pytest.raises(s.SourceError) as e:
        s.resolve(REPO, None, _settings(hf_hub, tmp_path))
    assert e.value.reason == s.PICKLE_REFUSED


def test_unreachable_endpoint_is_retryable(tmp_path: Path) -> None:
    settings = s.SourceSettings(hf_endpoint=servers.closed_url(), timeout_s=2)
    with pytest.raises(s.SourceError) as e:
        s.resolve(REPO, None, settings)
    assert (
        e.value.reason == s.SOURCE_UNREACHABLE and e.value.retry and "cannot reach the Hub" in e.value.message
    )


def test_repo_deleted_after_registration(tmp_path: Path, repo: tuple[Any, str, Path]) -> None:
    hub, _, _ = repo
    settings = _settings(hub, tmp_path)
    r = s.resolve(REPO, None, settings)
    hub.delete_repo(REPO)
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings, retries=0)
    with pytest.raises(LoraplaneError) as e:
        cache.prefetch(r)
    assert (
        e.value.reason == s.FILE_MISSING and "disappeared" in e.value.message and cache.index.entries() == []
    )


def test_offline_mode_from_a_warm_cache(
    tmp_path: Path, repo: tuple[Any, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolved and prefetched online; then HF_HUB_OFFLINE=1 and the Hub gone: same ref, no network."""
    hub, sha, _ = repo
    online = _settings(hub, tmp_path)
    r = s.resolve(REPO, "main", online)
    Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=online).prefetch(r)
    seen = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = s.SourceSettings(hf_endpoint=servers.closed_url(), state_dir=tmp_path / "state")
    again = s.resolve(REPO, "main", offline)
    assert again == r and again.resolved_revision == sha
    restarted = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=offline)
    assert restarted.index.lookup(again.cache_key) is not None
    assert restarted.prefetch(again).cache_key == r.cache_key
    assert len(hub.requests) == seen
    with pytest.raises(s.SourceError) as e:
        s.resolve(REPO, "v9", offline)
    assert e.value.reason == s.OFFLINE_NOT_CACHED and "HF_HUB_OFFLINE" in e.value.message


def test_offline_mode_from_a_preseeded_hub_cache(tmp_path: Path, repo: tuple[Any, str, Path]) -> None:
    """A huggingface_hub cache filled by hf_hub_download (e.g. an init container) serves offline."""
    from huggingface_hub import hf_hub_download

    hub, sha, d = repo
    hub_cache = tmp_path / "hf-cache"
    for name in a.ADAPTER_FILES:
        hf_hub_download(REPO, name, cache_dir=hub_cache, endpoint=hub.url)
    offline = s.SourceSettings(hf_endpoint=servers.closed_url(), hf_offline=True, hf_cache_dir=hub_cache)
    r = s.resolve(REPO, None, offline)
    assert r.resolved_revision == sha and r.local_dir is not None
    entry = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=offline).prefetch(r)
    assert (entry.path / "adapter_model.safetensors").read_bytes() == (
        d / "adapter_model.safetensors"
    ).read_bytes()


def test_hf_endpoint_environment_variable_is_honoured(tmp_path: Path, repo: tuple[Any, str, Path]) -> None:
    hub, sha, _ = repo
    env = {**os.environ, "HF_ENDPOINT": hub.url}
    env.pop("HF_HUB_OFFLINE", None)
    code = (
        "from loraplane.worker import sources as s\n"
        f"print(s.resolve({REPO!r}, None, s.SourceSettings(timeout_s=5)).resolved_revision)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == sha


def test_pinned_commit_resolves_while_the_hub_is_down(tmp_path: Path, repo: tuple[Any, str, Path]) -> None:
    """A commit never changes, so its recorded resolution is still exact; a branch is not guessed."""
    hub, sha, _ = repo
    s.resolve(REPO, sha, _settings(hub, tmp_path))
    s.resolve(REPO, "main", _settings(hub, tmp_path))
    down = s.SourceSettings(hf_endpoint=servers.closed_url(), timeout_s=2, state_dir=tmp_path / "state")
    assert s.resolve(REPO, sha, down).resolved_revision == sha
    with pytest.raises(s.SourceError) as e:
        s.resolve(REPO, "main", down)
    assert e.value.reason == s.SOURCE_UNREACHABLE
