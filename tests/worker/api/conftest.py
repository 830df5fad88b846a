"""Fixtures for the serving tests: a tiny Llama, PEFT adapters, the PEFT reference, engines and servers.

Each test that needs its own engine shape gets one from ``make_server`` (a real aiohttp server on
127.0.0.1 in a thread, and the engine thread behind it); everything stops at the end of the test.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplane.worker.api.server import ServeSettings, build_app, serve_in_thread
from loraplane.worker.engine.scheduler import SchedulerSettings
from loraplane.worker.engine.service import Engine, EngineSettings
from loraplane.worker.registry import AdapterVersion, Registry

_path = Path(__file__).parents[2] / "models.py"
_spec = importlib.util.spec_from_file_location("models", _path)
models = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules.setdefault("models", models)
_spec.loader.exec_module(models)  # type: ignore[union-attr]
# Tests import the helpers below as `api_fixtures` (with --import-mode=importlib, conftest is no module name).
sys.modules.setdefault("api_fixtures", sys.modules[__name__])

BASE = "tiny-llama"
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
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    names = list(adapters)
    with models.quiet_peft():
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    return model


def reference_greedy(
    peft_model: Any,
    adapter: str | None,
    prompt: list[int],
    max_new: int,
    eos: set[int],
    *,
    ignore_eos: bool = False,
) -> list[int]:
    """PEFT's greedy continuation (full forward each step), stopping after EOS like the engine."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            x = torch.tensor([ids])
            if adapter is None:
                with peft_model.disable_adapter():
                    logits = peft_model(input_ids=x).logits
            else:
                peft_model.set_adapter(adapter)
                logits = peft_model(input_ids=x).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in eos and not ignore_eos:
                break
    return out


def reference_text(tokenizer: Any, tokens: list[int], eos: set[int]) -> str:
    return tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True)


@dataclass
class Served:
    url: str
    engine: Engine
    registry: Registry

    def add(self, adapter_id: int, name: str, path: Path | None, **fields: Any) -> AdapterVersion:
        version = AdapterVersion(
            id=adapter_id,
            served_name=name,
            adapter=f"team/{name}",
            base_model=BASE,
            state=fields.pop("state", "Ready"),
            local_dir=path,
            **fields,
        )
        self.registry.upsert(version)
        return version


MakeServer = Callable[..., Served]


@pytest.fixture
def make_server(tiny_llama: Path) -> Iterator[MakeServer]:
    """make_server(start=True, api_key="", max_body_bytes=..., **engine settings) -> Served."""
    stack: list[Any] = []

    def make(*, start: bool = True, api_key: str = "", max_body_bytes: int = 1 << 20, **kw: Any) -> Served:
        sched = {k: kw.pop(k) for k in list(kw) if k in SchedulerSettings.__dataclass_fields__}
        settings = EngineSettings(
            served_model_name=BASE,
            max_lora_rank=16,
            max_model_len=256,
            scheduler=SchedulerSettings(**sched),
            **kw,
        )
        registry = Registry()
        engine = Engine.load(tiny_llama, settings, registry)
        if start:
            engine.run()
        stack.append(engine.stop)
        server = serve_in_thread(
            build_app(engine, registry, ServeSettings(api_key=api_key, max_body_bytes=max_body_bytes))
        )
        url = server.__enter__()
        stack.append(lambda: server.__exit__(None, None, None))
        return Served(url, engine, registry)

    yield make
    for close in reversed(stack):
        close()
