"""Fixtures shared by the worker's tests.

root / settings       a local adapter root and SourceSettings allowing it (the source and cache tests)
tiny_llama (session)  a tiny Llama checkpoint (tests/support/models.py), in a directory named tiny-llama
adapters (session)    five PEFT adapters of it by name (a0..a4): ranks differ, one is rsLoRA, one uses
                      rank/alpha patterns and one layer only, some a subset of the modules
peft_model (session)  the reference: the base model with every adapter loaded under its name
The engine tests (engine/) and the serving tests (api/) share these three: made once per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import models
from support.procs import BASE_MODEL as BASE

from loraplane.worker import sources as s

#: name -> LoraConfig keywords.
ADAPTERS: dict[str, dict[str, Any]] = {
    "a0": dict(r=2, alpha=4, seed=1),
    "a1": dict(r=8, alpha=16, seed=2, target_modules=["q_proj", "v_proj"]),
    "a2": dict(r=16, alpha=8, seed=3, use_rslora=True),
    "a3": dict(
        r=4,
        alpha=8,
        seed=4,
        rank_pattern={"q_proj": 8},
        alpha_pattern={"down_proj": 32},
        layers_to_transform=[1],
    ),
    "a4": dict(r=6, alpha=12, seed=5, target_modules=["gate_proj", "up_proj", "down_proj"]),
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "adapters"
    r.mkdir()
    return r


@pytest.fixture
def settings(root: Path) -> s.SourceSettings:
    return s.SourceSettings(local_roots=(root,))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.make_tiny_llama(tmp_path_factory.mktemp("models") / BASE)


@pytest.fixture(scope="session")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-adapters")
    return {name: models.make_peft_adapter(tiny_llama, root / name, **kw) for name, kw in ADAPTERS.items()}


@pytest.fixture(scope="session")
def peft_model(tiny_llama: Path, adapters: dict[str, Path]) -> Any:
    return models.peft_reference(tiny_llama, adapters)
