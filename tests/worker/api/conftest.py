"""Fixtures for the serving tests: engines and servers (the tiny Llama, the PEFT adapters and the PEFT
reference are tests/worker/conftest.py's, shared with the engine tests).

Each test that needs its own engine shape gets one from ``make_server`` (a real aiohttp server on
127.0.0.1 in a thread, and the engine thread behind it); everything stops at the end of the test.
The plain helpers the tests import (reference_greedy, Served, ...) are in support.api.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.api import BASE, MakeServer, Served

from loraplane.worker.api.webapp import ServeSettings, build_app, serve_in_thread
from loraplane.worker.builtin.scheduler import SchedulerSettings
from loraplane.worker.builtin.service import Engine, EngineSettings
from loraplane.worker.inference.engines import EngineSlot
from loraplane.worker.registry import Registry


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
        registry.on_retired(engine.retire_adapter)  # as the worker's assembly wires them
        server = serve_in_thread(build_app(EngineSlot(engine), registry, ServeSettings(**serve)))
        url = server.__enter__()
        stack.append(lambda: server.__exit__(None, None, None))
        return Served(url, engine, registry)

    yield make
    for close in reversed(stack):
        close()
