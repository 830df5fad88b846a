"""Fixtures for the engine tests: a tiny Llama checkpoint, five PEFT adapters and the PEFT reference.

The builders are support.models (tests/support/models.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import models

#: name -> LoraConfig keywords; ranks differ, one is rsLoRA, some use patterns or subsets of modules.
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


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: models.make_peft_adapter(tiny_llama, root / name, **kw) for name, kw in ADAPTERS.items()}


@pytest.fixture(scope="session")
def peft_model(tiny_llama: Path, adapters: dict[str, Path]) -> Any:
    """The reference: the base model with every adapter loaded under its name."""
    return models.peft_reference(tiny_llama, adapters)
