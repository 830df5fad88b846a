"""Greedy generation with the runner matches PEFT's generate(do_sample=False) token for token,
while other sequences join and leave the batch between steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraplane.worker.builtin.runner import ModelRunner, SeqStep, load_adapter_weights


@dataclass
class Request:
    seq_id: int
    prompt: list[int]
    adapter: str | None
    max_new: int
    join_at: int  # step at which it enters the batch
    out: list[int] = field(default_factory=list)


def peft_greedy(peft_model: Any, adapter: str | None, prompt: list[int], max_new: int) -> list[int]:
    x = torch.tensor([prompt])
    kw = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                y = peft_model.generate(input_ids=x, **kw)
        else:
            peft_model.set_adapter(adapter)
            y = peft_model.generate(input_ids=x, **kw)
    return y[0, len(prompt) :].tolist()


def test_greedy_generation_matches_peft_with_joins_and_leaves(
    tiny_llama: Path,
    adapters: dict[str, Path],
    peft_model: Any,
) -> None:
    runner = ModelRunner(tiny_llama, max_loras=4, max_lora_rank=16, max_seqs=8, max_model_len=64)
    # four slots for five adapters: a slot is refilled while other sequences keep running
    requests = [
        Request(1, [1, 5, 9, 33, 47], "a0", 8, 0),
        Request(2, [1, 200, 12], "a2", 12, 0),
        Request(3, [1, 7, 7, 64, 65, 66], None, 6, 2),
        Request(4, [1, 42, 43], "a1", 9, 3),
        Request(5, [1, 250, 251, 252, 3], "a3", 7, 5),
        Request(6, [1, 99], "a4", 10, 9),  # joins after request 1 left and reuses its slot
        Request(7, [1, 11, 22, 33], "a2", 5, 9),
    ]
    eos = runner.config.eos_token_id
    slot_of: dict[str, int] = {}
    free_slots = list(range(runner.max_loras))
    active: list[Request] = []
    done: list[Request] = []
    for step in range(64):
        for r in requests:
            if r.join_at == step:
                if r.adapter is not None and r.adapter not in slot_of:
                    in_use = {q.adapter for q in active}
                    for name in [n for n in slot_of if n not in in_use]:  # evict idle adapters
                        free_slots.append(slot_of.pop(name))
                    slot = free_slots.pop(0)
                    runner.set_slot(
                        slot, load_adapter_weights(adapters[r.adapter], runner.config, adapter_id=slot)
                    )
                    slot_of[r.adapter] = slot
                runner.allocate(r.seq_id)
                active.append(r)
        if not active and all(r.join_at < step for r in requests):
            break
        if not active:
            continue
        batch = [
            SeqStep(
                r.seq_id,
                r.prompt if not r.out else [r.out[-1]],
                -1 if r.adapter is None else slot_of[r.adapter],
            )
            for r in active
        ]
        logits = runner.step(batch)
        for r, row in zip(list(active), logits, strict=True):
            r.out.append(int(row.argmax()))
            if len(r.out) >= r.max_new or r.out[-1] in eos:
                active.remove(r)
                runner.free(r.seq_id)
                done.append(r)
    assert len(done) == len(requests)
    for r in requests:
        assert r.out == peft_greedy(peft_model, r.adapter, r.prompt, r.max_new), (
            f"request {r.seq_id} ({r.adapter})"
        )
