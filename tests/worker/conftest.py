"""Fixtures shared by the worker's source and cache tests: a local adapter root and settings allowing it."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplane.worker import sources as s


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "adapters"
    r.mkdir()
    return r


@pytest.fixture
def settings(root: Path) -> s.SourceSettings:
    return s.SourceSettings(local_roots=(root,))
