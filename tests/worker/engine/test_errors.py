"""Bad input to the engine gets a PermanentError with a specific reason, and leaves the runner usable."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplane.errors import PermanentError
from loraplane.worker.builtin.runner import AdapterWeights, ModelRunner, SeqStep, load_adapter_weights


@pytest.fixture(scope="module")
def runner(tiny_llama: Path) -> ModelRunner:
    return ModelRunner(tiny_llama, max_loras=2, max_lora_rank=8, max_seqs=2, max_model_len=16)


def _weights(runner: ModelRunner, rank: int, shape_in: int | None = None) -> AdapterWeights:
    fan_in, fan_out = runner.config.proj_shape("q_proj")
    a, b = torch.ones(rank, shape_in or fan_in), torch.ones(fan_out, rank)
    return AdapterWeights(adapter_id=1, rank=rank, scaling=1.0, weights={(0, "q_proj"): (a, b)}, nbytes=0)


RUNNER_CASES: list[tuple[str, Callable[[ModelRunner], object], str]] = [
    ("step on an unknown sequence", lambda r: r.step([SeqStep(99, [1], -1)]), "SequenceUnknown"),
    (
        "same seq twice in one step",
        lambda r: r.step([SeqStep(0, [1], -1), SeqStep(0, [2], -1)]),
        "DuplicateSequence",
    ),
    ("slot without an adapter", lambda r: r.step([SeqStep(0, [1], 1)]), "SlotEmpty"),
    ("token id outside the vocab", lambda r: r.step([SeqStep(0, [10**6], -1)]), "TokenOutOfRange"),
    ("prompt beyond max_model_len", lambda r: r.step([SeqStep(0, [1] * 17, -1)]), "SequenceTooLong"),
    ("empty step for a sequence", lambda r: r.step([SeqStep(0, [], -1)]), "EmptyStep"),
    ("rank above max_lora_rank", lambda r: r.set_slot(0, _weights(r, 16)), "RankTooLarge"),
    ("A of the wrong width", lambda r: r.set_slot(0, _weights(r, 4, shape_in=3)), "AdapterShapeMismatch"),
    ("slot out of range", lambda r: r.set_slot(5, _weights(r, 4)), "SlotOutOfRange"),
]


@pytest.mark.parametrize(("case", "call", "reason"), RUNNER_CASES, ids=[c[0] for c in RUNNER_CASES])
def test_runner_refuses(
    runner: ModelRunner, case: str, call: Callable[[ModelRunner], object], reason: str
) -> None:
    runner.allocate(0)
    try:
        with pytest.raises(PermanentError) as err:
            call(runner)
        assert err.value.reason == reason, err.value
        assert runner.seq_len(0) == 0  # a refused step leaves no trace in the cache
        runner.step([SeqStep(0, [1, 2], -1)])  # and the runner still works
    finally:
        runner.free(0)


def test_kv_cache_full(runner: ModelRunner) -> None:
    runner.allocate(0)
    runner.allocate(1)
    try:
        with pytest.raises(PermanentError) as err:
            runner.allocate(2)
        assert err.value.reason == "KVCacheFull"
    finally:
        runner.free(0)
        runner.free(1)


def _edit_config(d: Path, **change: object) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(change)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def _rename_tensor(d: Path) -> None:
    path = d / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(iter(tensors))
    tensors[key.replace("lora_A", "lora_C")] = tensors.pop(key)
    save_file(tensors, str(path))


# The loader reads through validation's reader (worker/inference/peft.py): the same reasons as validation.
ADAPTER_CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("no adapter_config.json", lambda d: (d / "adapter_config.json").unlink(), "FileMissing"),
    ("pickled weights only", lambda d: (d / "adapter_model.safetensors").unlink(), "FileMissing"),
    ("DoRA", lambda d: _edit_config(d, use_dora=True), "DoRANotSupported"),
    ("bias trained", lambda d: _edit_config(d, bias="all"), "BiasNotSupported"),
    (
        "modules_to_save",
        lambda d: _edit_config(d, modules_to_save=["lm_head"]),
        "EmbeddingChangeNotSupported",
    ),
    ("unknown tensor name", _rename_tensor, "ModulesToSaveNotSupported"),
    (
        "layers_to_transform excludes all",
        lambda d: _edit_config(d, layers_to_transform=[7]),
        "LayerOutOfRange",
    ),
    ("config not JSON", lambda d: (d / "adapter_config.json").write_text("{"), "MalformedConfig"),
]


@pytest.mark.parametrize(("case", "damage", "reason"), ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_load_adapter_refuses(
    runner: ModelRunner,
    adapters: dict[str, Path],
    tmp_path: Path,
    case: str,
    damage: Callable[[Path], None],
    reason: str,
) -> None:
    d = tmp_path / "adapter"
    shutil.copytree(adapters["a0"], d)
    damage(d)
    with pytest.raises(PermanentError) as err:
        load_adapter_weights(d, runner.config, adapter_id=1)
    assert err.value.reason == reason, err.value


def test_adapter_weights_carry_rank_scaling_and_bytes(runner: ModelRunner, adapters: dict[str, Path]) -> None:
    w = load_adapter_weights(adapters["a2"], runner.config, adapter_id=7)  # r=16, alpha=8, rsLoRA
    assert (w.adapter_id, w.rank) == (7, 16)
    assert w.scaling == pytest.approx(8 / 16**0.5)
    assert len(w.weights) == 2 * 7
    assert w.nbytes == sum(a.nbytes + b.nbytes for a, b in w.weights.values())
    w3 = load_adapter_weights(
        adapters["a3"], runner.config, adapter_id=8
    )  # rank_pattern q_proj: 8, layer 1 only
    assert w3.rank == 8 and {layer for layer, _ in w3.weights} == {1}


def test_kv_reservations(tiny_llama: Path) -> None:
    """Sequences reserve what they ask for; the pool refuses what it cannot hold, and frees blocks for reuse."""
    runner = ModelRunner(tiny_llama, max_seqs=4, max_model_len=64, kv_cache_tokens=64)
    runner.allocate(0, max_tokens=20)  # two blocks of 16
    runner.allocate(1, max_tokens=32)
    assert runner.kv_free_tokens == 0
    with pytest.raises(PermanentError) as err:
        runner.allocate(2, max_tokens=1)
    assert err.value.reason == "KVCacheFull"
    with pytest.raises(PermanentError) as err:
        runner.step([SeqStep(0, list(range(3, 36)), -1)])  # 33 tokens > its 32-token reservation
    assert err.value.reason == "SequenceTooLong"
    with pytest.raises(PermanentError) as err:
        runner.allocate(3, max_tokens=65)
    assert err.value.reason == "SequenceTooLong"
    runner.free(1)
    assert runner.kv_free_tokens == 32
    runner.allocate(2, max_tokens=32)
