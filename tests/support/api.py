"""The serving tests' helpers: the PEFT reference they compare the engine with, and a served engine.

reference_greedy(peft_model, adapter, prompt, max_new, eos)  PEFT's greedy continuation (full forward)
reference_text(tokenizer, tokens, eos)                       its text, EOS dropped
Served(url, engine, registry)                                one engine behind a real HTTP server; .add()
MakeServer                                                   the make_server fixture's type
The fixtures: make_server in tests/worker/api/conftest.py; tiny_llama, adapters, peft_model in tests/worker/conftest.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplane.worker.builtin.service import Engine
from loraplane.worker.registry import Registry, VersionEntry

BASE = "tiny-llama"


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

    def add(self, adapter_id: int, name: str, path: Path | None, **fields: Any) -> VersionEntry:
        version = VersionEntry(
            id=adapter_id,
            served_name=name,
            adapter=f"team/{name}",
            state=fields.pop("state", "Ready"),
            local_dir=path,
            **fields,
        )
        if version.state == "Ready" and path is not None:  # as the worker does: the engine first
            asyncio.run(self.engine.add_adapter(version.lora_spec()))
        self.registry.upsert(version)
        return version


MakeServer = Callable[..., Served]
