"""The engine against its references: transformers for the base forward, PEFT for every adapter.

Tolerance: fp32 on CPU, logits compared with atol 1e-4 (rtol 1e-4); the tiny model's logits are O(1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from loraplane.worker.builtin.runner import ModelRunner, SeqStep, load_adapter_weights

ATOL = 1e-4
PROMPTS = [
    [1, 5, 9, 33, 47, 101],
    [1, 200, 12],
    [1, 7, 7, 7, 64, 65, 66, 67, 68, 150, 151],
    [1, 42],
    [1, 250, 251, 252, 3, 4, 5, 6, 8],
    [1, 99, 98, 97, 96],
    [1, 11, 22, 33, 44, 55, 66],
    [1, 123],
]
#: 8 requests over 5 adapters and the base model (None); a1 and a2 appear twice.
ROW_ADAPTERS = ["a0", "a1", None, "a2", "a1", "a3", None, "a4"]


def reference_logits(peft_model: Any, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """PEFT's logits at every position for one adapter (None = the base model)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                return peft_model(input_ids=x).logits[0].float()
        peft_model.set_adapter(adapter)
        return peft_model(input_ids=x).logits[0].float()


def make_runner(tiny_llama: Path, adapters: dict[str, Path], **kw: Any) -> tuple[ModelRunner, dict[str, int]]:
    runner = ModelRunner(tiny_llama, max_loras=8, max_lora_rank=16, max_seqs=16, max_model_len=128, **kw)
    slots = {}
    for i, (name, path) in enumerate(adapters.items()):
        runner.set_slot(i, load_adapter_weights(path, runner.config, adapter_id=100 + i))
        slots[name] = i
    return runner, slots


def test_base_forward_matches_transformers(tiny_llama: Path, peft_model: Any) -> None:
    runner = ModelRunner(tiny_llama, max_seqs=8, max_model_len=64)
    for i in range(3):
        runner.allocate(i)
    got = runner.step([SeqStep(i, PROMPTS[i], -1) for i in range(3)])
    for i in range(3):
        want = reference_logits(peft_model, None, PROMPTS[i])[-1]
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=ATOL)
    # two decode steps, all rows together
    seqs = [list(PROMPTS[i]) for i in range(3)]
    for t in (17, 18):
        got = runner.step([SeqStep(i, [t + i], -1) for i in range(3)])
        for i in range(3):
            seqs[i].append(t + i)
            torch.testing.assert_close(
                got[i], reference_logits(peft_model, None, seqs[i])[-1], atol=ATOL, rtol=ATOL
            )


@pytest.mark.parametrize("mode", ["auto", "segmented", "gathered"])
def test_heterogeneous_batch_matches_peft_row_by_row(
    tiny_llama: Path,
    adapters: dict[str, Path],
    peft_model: Any,
    mode: str,
) -> None:
    runner, slots = make_runner(tiny_llama, adapters)
    runner.lora_mode = mode
    batch = [SeqStep(i, PROMPTS[i], -1 if a is None else slots[a]) for i, a in enumerate(ROW_ADAPTERS)]
    for s in batch:
        runner.allocate(s.seq_id)
    got = runner.step(batch)
    seqs = [list(p) for p in PROMPTS]
    for i, a in enumerate(ROW_ADAPTERS):
        want = reference_logits(peft_model, a, seqs[i])[-1]
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=ATOL, msg=f"row {i} adapter {a} ({mode})")
        if a is not None:  # the adapter changes the output visibly
            assert (want - reference_logits(peft_model, None, seqs[i])[-1]).abs().max() > 0.05
    for t in (20, 21):  # decodes of the same rows
        got = runner.step([SeqStep(s.seq_id, [t], s.slot) for s in batch])
        for i, a in enumerate(ROW_ADAPTERS):
            seqs[i].append(t)
            want = reference_logits(peft_model, a, seqs[i])[-1]
            torch.testing.assert_close(got[i], want, atol=ATOL, rtol=ATOL, msg=f"decode row {i} adapter {a}")


def test_segmented_and_gathered_agree(tiny_llama: Path, adapters: dict[str, Path]) -> None:
    results = {}
    for mode in ("segmented", "gathered"):
        runner, slots = make_runner(tiny_llama, adapters)
        runner.lora_mode = mode
        batch = [SeqStep(i, PROMPTS[i], -1 if a is None else slots[a]) for i, a in enumerate(ROW_ADAPTERS)]
        for s in batch:
            runner.allocate(s.seq_id)
        out = [runner.step(batch)]
        out.append(runner.step([SeqStep(s.seq_id, [30], s.slot) for s in batch]))
        assert runner.last_lora_mode == mode
        results[mode] = torch.cat(out)
    torch.testing.assert_close(results["segmented"], results["gathered"], atol=1e-5, rtol=1e-5)


def test_auto_mode_picks_by_distinct_slots(tiny_llama: Path, adapters: dict[str, Path]) -> None:
    runner, slots = make_runner(tiny_llama, adapters)
    for i in range(8):
        runner.allocate(i)
    runner.step([SeqStep(i, PROMPTS[i], slots["a0"]) for i in range(8)])
    assert runner.last_lora_mode == "segmented"  # one adapter for every row
    names = list(adapters)
    runner.step([SeqStep(i, [5], slots[names[i]]) for i in range(5)])
    assert runner.last_lora_mode == "gathered"  # every decode row has its own adapter
    runner.step([SeqStep(i, [5], -1) for i in range(5)])
    assert runner.last_lora_mode == ""


@pytest.mark.parametrize(
    ("row_adapters", "mode"),
    [
        (["a0", "a0", "a0"], "segmented"),  # one adapter: one plain matmul over all tokens
        ([None, None, "a0", "a0", "a1", "a1"], "segmented"),  # base rows first, equal segments: views
        ([None, "a0", "a1", "a2", "a4"], "gathered"),  # all distinct after base rows: views
        (["a3", None, "a3", "a1", "a3"], "segmented"),  # unequal segments: padded gather/scatter
        (["a3", "a1", "a0", "a4"], "gathered"),  # slots not a range: gathered copies
    ],
)
def test_decode_layouts_match_peft(
    tiny_llama: Path,
    adapters: dict[str, Path],
    peft_model: Any,
    row_adapters: list[str | None],
    mode: str,
) -> None:
    runner, slots = make_runner(tiny_llama, adapters)
    seqs = [list(PROMPTS[i]) for i in range(len(row_adapters))]
    batch = [SeqStep(i, seqs[i], -1 if a is None else slots[a]) for i, a in enumerate(row_adapters)]
    for s in batch:
        runner.allocate(s.seq_id)
    runner.step(batch)
    got = runner.step([SeqStep(s.seq_id, [40 + s.seq_id], s.slot) for s in batch])  # decode: 1 token per row
    assert runner.last_lora_mode == mode
    for i, a in enumerate(row_adapters):
        seqs[i].append(40 + i)
        want = reference_logits(peft_model, a, seqs[i])[-1]
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=ATOL, msg=f"row {i} adapter {a}")


def test_chunked_prefill_and_slot_reuse(
    tiny_llama: Path,
    adapters: dict[str, Path],
    peft_model: Any,
) -> None:
    """A prompt may arrive in chunks across steps; a slot refilled with another adapter serves the new one."""
    runner, slots = make_runner(tiny_llama, adapters)
    prompt = PROMPTS[2]
    runner.allocate(0)
    runner.allocate(1)
    runner.step([SeqStep(0, prompt[:4], slots["a2"]), SeqStep(1, PROMPTS[0], -1)])
    got = runner.step([SeqStep(0, prompt[4:], slots["a2"]), SeqStep(1, [9], -1)])
    torch.testing.assert_close(got[0], reference_logits(peft_model, "a2", prompt)[-1], atol=ATOL, rtol=ATOL)
    runner.free(0)
    # slot of a2 now holds a4: a new sequence on that slot must see a4's weights only
    runner.set_slot(slots["a2"], load_adapter_weights(adapters["a4"], runner.config, adapter_id=999))
    runner.allocate(0)
    got = runner.step([SeqStep(0, prompt, slots["a2"])])
    torch.testing.assert_close(got[0], reference_logits(peft_model, "a4", prompt)[-1], atol=ATOL, rtol=ATOL)
    runner.clear_slot(slots["a2"])
    with pytest.raises(Exception, match="SlotEmpty"):
        runner.step([SeqStep(0, [5], slots["a2"])])


def test_prefill_joining_decodes_matches_peft(
    tiny_llama: Path,
    adapters: dict[str, Path],
    peft_model: Any,
) -> None:
    """Continuous batching's usual step: decodes on three adapters plus a new prompt on a fourth
    (segments of 1 and 11 tokens, cut into chunks rather than padded to 11)."""
    runner, slots = make_runner(tiny_llama, adapters)
    names = ["a0", "a1", "a2"]
    for i, name in enumerate(names):
        runner.allocate(i)
        runner.step([SeqStep(i, PROMPTS[i], slots[name])])
    runner.allocate(3)
    batch = [SeqStep(i, [50 + i], slots[name]) for i, name in enumerate(names)]
    got = runner.step([*batch, SeqStep(3, PROMPTS[2], slots["a3"])])
    assert runner.last_lora_mode == "segmented"
    for i, name in enumerate(names):
        want = reference_logits(peft_model, name, [*PROMPTS[i], 50 + i])[-1]
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=ATOL, msg=f"decode row {i} ({name})")
    want = reference_logits(peft_model, "a3", PROMPTS[2])[-1]
    torch.testing.assert_close(got[3], want, atol=ATOL, rtol=ATOL, msg="prefill row (a3)")


@pytest.mark.parametrize("mode", ["segmented", "gathered"])
@pytest.mark.parametrize(
    "row_adapters",
    [
        # q/v only beside gate/up/down only: no linear has all its projections targeted in the
        # batch (q/v of qkv, gate/up of gate_up), so each projection is shrunk on its own
        ["a1", "a4", None, "a1", "a4"],
        # rank 16 with every projection, rank 8 q/v and rank 6 MLP, one layer only with per-module
        # ranks: one shrink per linear over slots whose A rows are partly zero
        ["a2", "a1", "a4", "a3", "a2"],
    ],
)
def test_linears_shared_by_adapters_with_different_targets_match_peft(
    tiny_llama: Path,
    adapters: dict[str, Path],
    peft_model: Any,
    row_adapters: list[str | None],
    mode: str,
) -> None:
    """q/k/v (gate/up) share one shrink per layer: every row must still get only its own adapter's
    projections, at its own rank, whichever projections the other rows' adapters target."""
    runner, slots = make_runner(tiny_llama, adapters)
    runner.lora_mode = mode
    seqs = [list(PROMPTS[i]) for i in range(len(row_adapters))]
    batch = [SeqStep(i, seqs[i], -1 if a is None else slots[a]) for i, a in enumerate(row_adapters)]
    for s in batch:
        runner.allocate(s.seq_id)
    outs = [runner.step(batch)]
    outs.append(runner.step([SeqStep(s.seq_id, [60 + s.seq_id], s.slot) for s in batch]))
    assert runner.last_lora_mode == mode
    for step, got in enumerate(outs):
        for i, a in enumerate(row_adapters):
            ids = seqs[i] + ([60 + i] if step else [])
            want = reference_logits(peft_model, a, ids)[-1]
            torch.testing.assert_close(got[i], want, atol=ATOL, rtol=ATOL, msg=f"step {step} row {i} ({a})")
