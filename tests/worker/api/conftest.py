"""Fixtures for the serving tests: a tiny Llama, PEFT adapters, the PEFT reference, engines and servers.

Each test that needs its own engine shape gets one from ``make_server`` (a real aiohttp server on
127.0.0.1 in a thread, and the engine thread behind it); everything stops at the end of the test.
The plain helpers the tests import (reference_greedy, Served, ...) are in support.api.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import models
from support.api import BASE, MakeServer, Served

from loraplane.worker.api.server import ServeSettings, build_app, serve_in_thread
from loraplane.worker.engine.scheduler import SchedulerSettings
from loraplane.worker.engine.service import Engine, EngineSettings
from loraplane.worker.registry import Registry

#: name -> LoraConfig keywords: different ranks and targets, one rsLoRA.
ADAPTERS: dict[str, dict[str, Any]] = {
    "a0": dict(r=2, alpha=4, seed=11),
    "a1": dict(r=8, alpha=16, seed=12, target_modules=["q_proj", "v_proj"]),
    "a2": dict(r=16, alpha=8, seed=13, use_rslora=True),
    "a3": dict(r=4, alpha=8, seed=14, init_scale=0.2),
    "a4": dict(r=6, alpha=12, seed=15, target_modules=["gate_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.make_tiny_llama(tmp_path_factory.mktemp("api") / BASE)


@pytest.fixture(scope="session")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api-adapters")
    return {name: models.make_peft_adapter(tiny_llama, root / name, **kw) for name, kw in ADAPTERS.items()}


@pytest.fixture(scope="session")
def peft_model(tiny_llama: Path, adapters: dict[str, Path]) -> Any:
    return models.peft_reference(tiny_llama, adapters)


@pytest.fixture
def make_server(tiny_llama: Path) -> Iterator[MakeServer]:
    """make_server(start=True, **ServeSettings, **SchedulerSettings, **EngineSettings) -> Served."""
    stack: list[Any] = []

    def make(*, start: bool = True, **kw: Any) -> Served:
        serve = {k: kw.pop(k) for k in list(kw) if k in ServeSettings.__dataclass_fields__}
        sched = {k: kw.pop(k) for k in list(kw) if k in SchedulerSettings.__dataclass_fields__}
        settings = EngineSettings(
            served_model_name=BASE,
            max_lora_rank=16,
            max_model_len=256,
            scheduler=SchedulerSettings(**sched),
            **kw,
        )
        registry = Registry()
        engine = Engine.load(tiny_llama, settings)
        if start:
            engine.run()
        stack.append(engine.stop)
        server = serve_in_thread(build_app(engine, registry, ServeSettings(**serve)))
        url = server.__enter__()
        stack.append(lambda: server.__exit__(None, None, None))
        return Served(url, engine, registry)

    yield make
    for close in reversed(stack):
        close()
