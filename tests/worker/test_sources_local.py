"""Local adapter paths: only under the configured roots, no escapes by '..' or symlinks, named failures."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from support import adapters

from loraplane.worker import sources as s


def test_resolves_absolute_and_file_uri_alike(root: Path, settings: s.SourceSettings) -> None:
    d = adapters.write_adapter(root / "sql")
    a = s.resolve(str(d), None, settings)
    b = s.resolve(f"file://{d}", None, settings)
    assert a == b and a.kind == "local" and a.uri == f"file://{d}"
    assert [f.name for f in a.files] == ["adapter_config.json", "adapter_model.safetensors"]
    assert a.files[1].size == (d / "adapter_model.safetensors").stat().st_size
    assert len(a.resolved_revision) == 40 and a.cache_key.startswith("local-")
    assert all(c.isalnum() or c in "._-" for c in a.cache_key)


def test_revision_changes_when_the_files_change(root: Path, settings: s.SourceSettings) -> None:
    d = adapters.write_adapter(root / "sql")
    before = s.resolve(str(d), None, settings)
    assert s.resolve(str(d), None, settings) == before  # stable while nothing changes
    adapters.write_adapter(root / "sql", seed=7)
    os.utime(d / "adapter_model.safetensors", ns=(1, 1))  # a distinct mtime even on coarse clocks
    after = s.resolve(str(d), None, settings)
    assert after.resolved_revision != before.resolved_revision and after.cache_key != before.cache_key


def test_fetch_file_streams_and_hashes(root: Path, settings: s.SourceSettings) -> None:
    import hashlib

    d = adapters.write_adapter(root / "sql")
    r = s.resolve(str(d), None, settings)
    out = io.BytesIO()
    seen: list[int] = []
    got = s.fetch_file(r, "adapter_model.safetensors", out, settings, progress=lambda n, _t: seen.append(n))
    data = (d / "adapter_model.safetensors").read_bytes()
    assert out.getvalue() == data and got.sha256 == hashlib.sha256(data).hexdigest() and seen[-1] == len(data)


# (id, path given as a function of the root, reason, message fragment)
PATH_CASES: list[tuple[str, Any, str, str]] = [
    ("outside-roots", lambda root: "/etc", s.PATH_NOT_ALLOWED, "outside the allowed local roots"),
    ("sibling-prefix", lambda root: f"{root}-evil/x", s.PATH_NOT_ALLOWED, "outside the allowed local roots"),
    ("dotdot", lambda root: f"{root}/../x", s.PATH_NOT_ALLOWED, "'..'"),
    ("dotdot-file-uri", lambda root: f"file://{root}/a/../../etc", s.PATH_NOT_ALLOWED, "'..'"),
    ("relative-file-uri", lambda root: "file://adapters/x", s.INVALID_PATH, "file:///dir"),
    ("unknown-scheme", lambda root: "gcs://bucket/x", s.INVALID_PATH, "s3://bucket/prefix"),
    ("relative-path", lambda root: "adapters/x/y", s.INVALID_PATH, "absolute local path"),
    ("empty", lambda root: "", s.INVALID_PATH, "without spaces"),
    ("space", lambda root: f"{root}/a b", s.INVALID_PATH, "without spaces"),
    ("trailing-newline", lambda root: "team/adapter\n", s.INVALID_PATH, "without spaces"),
    ("missing-dir", lambda root: f"{root}/nothing-here", s.SOURCE_NOT_FOUND, "not a directory"),
]


@pytest.mark.parametrize(
    ("make", "reason", "fragment"), [c[1:] for c in PATH_CASES], ids=[c[0] for c in PATH_CASES]
)
def test_refused_paths(root: Path, settings: s.SourceSettings, make, reason, fragment) -> None:
    with pytest.raises(s.SourceError) as e:
        s.resolve(make(root), None, settings)
    assert e.value.reason == reason and fragment in e.value.message and not e.value.retry


def test_no_roots_means_no_local_paths(root: Path) -> None:
    d = adapters.write_adapter(root / "a")
    with pytest.raises(s.SourceError) as e:
        s.resolve(str(d), None, s.SourceSettings())
    assert e.value.reason == s.PATH_NOT_ALLOWED and "configure a local root" in e.value.message


def test_symlinked_directory_escaping_the_root(
    tmp_path: Path, root: Path, settings: s.SourceSettings
) -> None:
    outside = adapters.write_adapter(tmp_path / "elsewhere")
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(s.SourceError) as e:
        s.resolve(str(root / "link"), None, settings)
    assert e.value.reason == s.SYMLINK_ESCAPE and str(outside) in e.value.message


def test_symlinked_file_escaping_the_root(tmp_path: Path, root: Path, settings: s.SourceSettings) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    d = adapters.write_adapter(root / "a")
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").symlink_to(secret)
    with pytest.raises(s.SourceError) as e:
        s.resolve(str(d), None, settings)
    assert e.value.reason == s.SYMLINK_ESCAPE and "adapter_config.json" in e.value.message


def test_symlink_inside_the_root_is_fine(root: Path, settings: s.SourceSettings) -> None:
    d = adapters.write_adapter(root / "v1")
    (root / "current").symlink_to(d, target_is_directory=True)
    assert s.resolve(str(root / "current"), None, settings).local_dir == str(d)


def test_a_symlinked_root_itself_is_allowed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    adapters.write_adapter(real / "a")
    (tmp_path / "mnt").symlink_to(real, target_is_directory=True)
    r = s.resolve(str(tmp_path / "mnt" / "a"), None, s.SourceSettings(local_roots=(tmp_path / "mnt",)))
    assert r.uri == f"file://{tmp_path}/mnt/a"


@pytest.mark.parametrize(("remove", "add_bin", "reason", "fragment"), [
    ("adapter_model.safetensors", True, s.PICKLE_REFUSED, "adapter_model.bin"),
    ("adapter_model.safetensors", False, s.FILE_MISSING, "adapter_model.safetensors"),
    ("adapter_config.json", False, s.FILE_MISSING, "adapter_config.json"),
], ids=["bin-only", "no-weights", "no-config"])  # fmt: skip
def test_missing_and_pickled_files(
    root: Path, settings: s.SourceSettings, remove, add_bin, reason, fragment
) -> None:
    d = adapters.write_adapter(root / "a")
    (d / remove).unlink()
    if add_bin:
        (d / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(s.SourceError) as e:
        s.resolve(str(d), None, settings)
    assert e.value.reason == reason and fragment in e.value.message


def test_oversized_files_are_refused_at_resolve(root: Path) -> None:
    d = adapters.write_adapter(root / "a")
    with pytest.raises(s.SourceError) as e:
        s.resolve(str(d), None, s.SourceSettings(local_roots=(root,), max_file_bytes=1000))
    assert e.value.reason == s.TOO_LARGE and "adapter_model.safetensors" in e.value.message


def test_revision_on_a_local_path_is_an_opaque_label(root: Path, settings: s.SourceSettings) -> None:
    """The CRD (and examples/) call revision a version label for local and s3:// paths and admission
    accepts it; the worker refused it ("a local path has no revisions"). Now it is recorded, and the
    bytes still decide the resolved revision."""
    d = adapters.write_adapter(root / "a")
    plain = s.resolve(str(d), None, settings)
    labelled = s.resolve(str(d), "2026-11-01", settings)
    assert (
        labelled.requested_revision == "2026-11-01" and labelled.resolved_revision == plain.resolved_revision
    )


# Whatever admission (the CRD's pydantic model = its CEL rules and pattern) answers, the worker answers.
GRAMMAR_PATHS = ["team/adapter", "hf://team/adapter", "/srv/a", "file:///srv/a", "s3://bucket/p/q", "s3://bucket",
                 "", "team", "team/", "team/adapter/x", "-team/adapter", "hf://team/adapter/", "file://srv/a",
                 "gs://bucket/x", "gcs://bucket/x", "gs://B/x", "s3://B/x", "s3://ab/x", "/srv/../etc", "/srv/a b", "team/adapter\n",
                 "relative/dir/x", "./a", "hf://", "s3://bucket/../x"]  # fmt: skip


@pytest.mark.parametrize("path", GRAMMAR_PATHS)
def test_the_worker_accepts_exactly_what_admission_accepts(path: str) -> None:
    import pydantic

    from loraplane.crds.models import LoRAAdapterSpec

    try:
        spec: LoRAAdapterSpec | None = LoRAAdapterSpec(baseModel="m", path=path)
    except pydantic.ValidationError:
        spec = None
    try:
        kind, _ = s.parse_path(path)
    except s.SourceError as e:
        assert spec is None, f"admission accepts {path!r}, the worker refuses it: {e}"
        assert e.reason in (s.INVALID_PATH, s.PATH_NOT_ALLOWED)
    else:
        assert spec is not None, f"admission refuses {path!r}, the worker accepts it"
        assert kind == spec.source_kind


def test_source_that_disappears_after_resolving(root: Path, settings: s.SourceSettings) -> None:
    d = adapters.write_adapter(root / "a")
    r = s.resolve(str(d), None, settings)
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(s.SourceError) as e:
        s.fetch_file(r, "adapter_model.safetensors", io.BytesIO(), settings)
    assert e.value.reason == s.FILE_MISSING and "disappeared" in e.value.message


def test_source_that_grows_after_resolving(root: Path, settings: s.SourceSettings) -> None:
    d = adapters.write_adapter(root / "a")
    r = s.resolve(str(d), None, settings)
    with open(d / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0" * 100)
    with pytest.raises(s.SourceError) as e:
        s.fetch_file(r, "adapter_model.safetensors", io.BytesIO(), settings)
    assert e.value.reason == s.SOURCE_CHANGED and e.value.retry


def test_settings_repr_hides_the_token() -> None:
    assert "hf_xyz" not in repr(s.SourceSettings(hf_token="hf_xyz"))


def test_the_adapters_chat_template_files_are_fetched_too(root: Path, settings: s.SourceSettings) -> None:
    d = adapters.write_adapter(root / "chat")
    (d / "chat_template.jinja").write_text("{{ messages }}")
    (d / "tokenizer_config.json").write_text("{}")
    (d / "README.md").write_text("not fetched")
    r = s.resolve(str(d), None, settings)
    assert [f.name for f in r.files] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "chat_template.jinja",
        "tokenizer_config.json",
    ]
    (d / "chat_template.jinja").write_text("x" * (settings.max_config_bytes + 1))
    with pytest.raises(s.SourceError) as e:
        s.resolve(str(d), None, settings)
    assert "chat_template.jinja" in e.value.message and "above the limit" in e.value.message
