"""Adapter validation against the base model: the bad-adapter matrix (one case each) beside good adapters."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file
from support import adapters

from loraplane.crds.errors import PermanentError, ValidationFailed
from loraplane.worker import validate as v

L0Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def base(tmp_path: Path) -> v.BaseModelInfo:
    return v.BaseModelInfo.from_pretrained_dir(adapters.write_base_config(tmp_path / "base"))


# --- good adapters ---------------------------------------------------------------------------------
def test_good_adapter_summary(tmp_path: Path, base: v.BaseModelInfo) -> None:
    d = adapters.write_adapter(tmp_path / "a", r=8, alpha=16, target_modules=adapters.ATTN + adapters.MLP)
    s = v.validate_adapter(d, base, max_lora_rank=16)
    assert (s.rank, s.alpha, s.scaling, s.use_rslora) == (8, 16.0, 2.0, False)
    assert s.target_modules == tuple(sorted(adapters.ATTN + adapters.MLP))
    assert s.sha256 == hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert s.size_bytes == sum(p.stat().st_size for p in d.iterdir())
    assert s.num_tensors == 2 * 2 * 7 and s.layers == (0, 1) and s.warnings == ()


def test_rslora_scaling(tmp_path: Path, base: v.BaseModelInfo) -> None:
    d = adapters.write_adapter(tmp_path / "a", r=16, alpha=8, config={"use_rslora": True})
    s = v.validate_adapter(d, base, max_lora_rank=16)
    assert s.use_rslora and s.scaling == pytest.approx(8 / math.sqrt(16))


def test_rank_pattern_and_layers_to_transform_are_honoured(tmp_path: Path, base: v.BaseModelInfo) -> None:
    d = adapters.write_adapter(
        tmp_path / "a", r=4, ranks={"q_proj": 8}, layers=(1,),
        config={"rank_pattern": {"q_proj": 8}, "layers_to_transform": [1]},
    )  # fmt: skip
    s = v.validate_adapter(d, base, max_lora_rank=8)
    assert s.rank == 8 and s.layers == (1,)


def test_base_model_name_mismatch_is_a_warning(tmp_path: Path, base: v.BaseModelInfo) -> None:
    d = adapters.write_adapter(tmp_path / "a", config={"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"})
    s = v.validate_adapter(d, base, max_lora_rank=16, served_base_name="mistralai/Mistral-7B-v0.1")
    assert (
        len(s.warnings) == 1 and "meta-llama/Llama-2-7b-hf" in s.warnings[0] and "Mistral-7B" in s.warnings[0]
    )
    same = v.validate_adapter(d, base, max_lora_rank=16, served_base_name="meta-llama/Llama-2-7b-hf")
    assert same.warnings == ()


def test_extra_vocab_allows_embedding_rows_within_it(tmp_path: Path, base: v.BaseModelInfo) -> None:
    emb = "base_model.model.model.embed_tokens.lora_embedding_A"
    d = adapters.write_adapter(tmp_path / "a", extra_tensors={emb: (8, 300 + 16)})
    v.validate_adapter(d, base, max_lora_rank=16, extra_vocab=16)
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16, extra_vocab=8)
    assert e.value.reason == v.EMBEDDING_CHANGE_NOT_SUPPORTED and "300 + extra 8" in e.value.message


# --- the bad-adapter matrix ------------------------------------------------------------------------
# (id, write_adapter keywords, validate keywords, expected reason, fragment of the message)
ERROR_CASES: list[tuple[str, dict[str, Any], dict[str, Any], str, str]] = [
    ("wrong-hidden-size", {"base": {"hidden_size": 128}}, {}, v.SHAPE_MISMATCH, "hidden_size 64"),
    ("gqa-shapes-of-an-mha-model", {"base": {"num_key_value_heads": 4}, "target_modules": ("k_proj",)}, {},
     v.SHAPE_MISMATCH, "k_proj gives 32 outputs"),
    ("rank-above-maximum", {"r": 32, "alpha": 32}, {"max_lora_rank": 16}, v.RANK_TOO_LARGE,
     "rank 32 is above this worker's maxLoraRank 16"),
    ("rank-pattern-above-maximum", {"r": 8, "ranks": {"v_proj": 32}, "config": {"rank_pattern": {"v_proj": 32}}},
     {"max_lora_rank": 16}, v.RANK_TOO_LARGE, "rank 32 (rank_pattern)"),
    ("rank-differs-from-config", {"r": 8, "config": {"r": 4}}, {}, v.SHAPE_MISMATCH, "adapter_config.json gives"),
    ("unknown-target-module", {"target_modules": ("q_proj", "c_attn")}, {}, v.UNKNOWN_TARGET_MODULE, "'c_attn'"),
    ("dora-in-config", {"config": {"use_dora": True}}, {}, v.DORA_NOT_SUPPORTED, "DoRA"),
    ("dora-magnitude-tensor", {"extra_tensors": {f"{L0Q}.lora_magnitude_vector.weight": (64,)}}, {},
     v.DORA_NOT_SUPPORTED, "magnitude"),
    ("bias-in-config", {"config": {"bias": "lora_only"}}, {}, v.BIAS_NOT_SUPPORTED, "bias='none'"),
    ("bias-tensor", {"extra_tensors": {f"{L0Q}.lora_B.bias": (64,)}}, {}, v.BIAS_NOT_SUPPORTED, "LoRA bias"),
    ("modules-to-save", {"config": {"modules_to_save": ["score"]}}, {}, v.MODULES_TO_SAVE_NOT_SUPPORTED, "'score'"),
    ("saved-module-tensor", {"extra_tensors": {"base_model.model.score.weight": (2, 64)}}, {},
     v.MODULES_TO_SAVE_NOT_SUPPORTED, "score.weight"),
    ("lm-head-in-modules-to-save", {"config": {"modules_to_save": ["lm_head"]}}, {},
     v.EMBEDDING_CHANGE_NOT_SUPPORTED, "lm_head"),
    ("embedding-lora", {"extra_tensors": {"base_model.model.model.embed_tokens.lora_embedding_A": (8, 300)}}, {},
     v.EMBEDDING_CHANGE_NOT_SUPPORTED, "embed_tokens"),
    ("layers-to-transform-out-of-range", {"config": {"layers_to_transform": [5]}}, {}, v.LAYER_OUT_OF_RANGE,
     "layer 5"),
    ("tensor-beyond-last-layer", {"layers": (0, 1, 2)}, {}, v.LAYER_OUT_OF_RANGE, "layer 2"),
    ("tensor-outside-layers-to-transform", {"config": {"layers_to_transform": [0]}}, {}, v.LAYER_OUT_OF_RANGE,
     "outside layers_to_transform [0]"),
    ("context-too-long", {}, {"max_length": 1024}, v.CONTEXT_TOO_LONG, "maxLength 1024 is beyond the 256 tokens"),
    ("not-lora", {"config": {"peft_type": "IA3"}}, {}, v.UNSUPPORTED_ADAPTER_TYPE, "'IA3'"),
    ("alpha-pattern", {"config": {"alpha_pattern": {"q_proj": 4}}}, {}, v.UNSUPPORTED_FEATURE, "per-module alpha"),
    ("no-lora-tensors", {"target_modules": ()}, {}, v.NO_LORA_WEIGHTS, "no lora_A"),
]  # fmt: skip


@pytest.mark.parametrize(("adapter_kw", "validate_kw", "reason", "fragment"),
                         [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])  # fmt: skip
def test_bad_adapter(
    tmp_path: Path, base: v.BaseModelInfo, adapter_kw, validate_kw, reason, fragment
) -> None:
    good = adapters.write_adapter(tmp_path / "good")
    bad = adapters.write_adapter(tmp_path / "bad", **adapter_kw)
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(bad, base, **{"max_lora_rank": 16, **validate_kw})
    reasons = [r for r, _ in e.value.problems]
    assert reason in reasons, e.value.problems
    assert fragment in e.value.message, e.value.message
    v.validate_adapter(good, base, max_lora_rank=16)  # the good one stays valid beside it


def test_every_problem_is_reported_at_once(tmp_path: Path, base: v.BaseModelInfo) -> None:
    d = adapters.write_adapter(tmp_path / "a", r=32, config={"use_dora": True, "bias": "all"}, layers=(0, 7))
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16, max_length=10_000)
    reasons = {r for r, _ in e.value.problems}
    assert {v.RANK_TOO_LARGE, v.DORA_NOT_SUPPORTED, v.BIAS_NOT_SUPPORTED, v.LAYER_OUT_OF_RANGE,
            v.CONTEXT_TOO_LONG} <= reasons  # fmt: skip


# --- files that must not be trusted ----------------------------------------------------------------
def test_truncated_safetensors_names_the_file(tmp_path: Path, base: v.BaseModelInfo) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == v.TRUNCATED_WEIGHTS and "adapter_model.safetensors" in e.value.message


@pytest.mark.parametrize(("content", "reason", "fragment"), [
    (b"\x01\x02", v.TRUNCATED_WEIGHTS, "too short"),
    (struct.pack("<Q", 1 << 40) + b"{}", v.HEADER_TOO_LARGE, "1099511627776-byte header"),
    (struct.pack("<Q", 4096) + b'{"a": 1}', v.TRUNCATED_WEIGHTS, "4096-byte header"),
    (struct.pack("<Q", 5) + b"{nope", v.MALFORMED_WEIGHTS, "unreadable safetensors header"),
], ids=["four-bytes", "enormous-header", "header-beyond-file", "header-not-json"])  # fmt: skip
def test_hostile_safetensors_headers(
    tmp_path: Path, base: v.BaseModelInfo, content, reason, fragment
) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    (d / "adapter_model.safetensors").write_bytes(content)
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert (
        e.value.reason == reason
        and fragment in e.value.message
        and "adapter_model.safetensors" in e.value.message
    )


def test_malformed_config_names_the_file(tmp_path: Path, base: v.BaseModelInfo) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text('{"r": 8,')
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == v.MALFORMED_CONFIG and "adapter_config.json is not valid JSON" in e.value.message


def test_oversized_config_is_not_read(tmp_path: Path, base: v.BaseModelInfo) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "pad": "x" * (2 << 20)}))
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == v.TOO_LARGE and "limit" in e.value.message


class _Boom:
    """Unpickling this writes a marker file: proof that a .bin was (wrongly) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "unpickled!"))


def test_pickled_weights_are_refused_never_unpickled(tmp_path: Path, base: v.BaseModelInfo) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    (d / "adapter_model.safetensors").unlink()
    marker = tmp_path / "marker"
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(PermanentError) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == v.PICKLE_REFUSED and "adapter_model.bin" in e.value.message
    assert not marker.exists()


def test_missing_files(tmp_path: Path, base: v.BaseModelInfo) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    (d / "adapter_config.json").unlink()
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == v.FILE_MISSING and "adapter_config.json" in e.value.message
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(PermanentError) as e2:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e2.value.reason == v.FILE_MISSING and "adapter_model.safetensors" in e2.value.message


# --- the base model --------------------------------------------------------------------------------
@pytest.mark.parametrize(("rope", "expected"), [
    (None, 256),
    ({"rope_type": "linear", "factor": 4.0}, 1024),
    ({"type": "dynamic", "factor": 2.0}, 512),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, 512),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}, 256),
], ids=["none", "linear", "dynamic", "yarn", "llama3"])  # fmt: skip
def test_effective_max_length_under_rope_scaling(tmp_path: Path, rope, expected) -> None:
    info = v.BaseModelInfo.from_pretrained_dir(adapters.write_base_config(tmp_path / "b", rope_scaling=rope))
    assert info.max_length == expected


def test_context_too_long_names_both_numbers_under_rope_scaling(tmp_path: Path) -> None:
    cfg = adapters.write_base_config(tmp_path / "b", rope_scaling={"rope_type": "linear", "factor": 4.0})
    base = v.BaseModelInfo.from_pretrained_dir(cfg)
    d = adapters.write_adapter(tmp_path / "a")
    v.validate_adapter(d, base, max_lora_rank=16, max_length=1024)
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16, max_length=1025)
    assert (
        "1025" in e.value.message
        and "1024" in e.value.message
        and "max_position_embeddings 256" in e.value.message
    )


def test_linear_shapes_for_gqa(tmp_path: Path) -> None:
    info = v.BaseModelInfo.from_pretrained_dir(adapters.write_base_config(tmp_path / "b"))
    assert info.linear_shapes == adapters.dims(adapters.BASE_CONFIG)
    assert info.linear_shapes["k_proj"] == (64, 32)


def test_checkpoint_that_disagrees_with_its_config_is_refused(tmp_path: Path) -> None:
    d = adapters.write_base_config(tmp_path / "b")
    save_file(
        {"model.layers.0.self_attn.q_proj.weight": np.zeros((32, 64), np.float32)},
        str(d / "model.safetensors"),
    )
    with pytest.raises(PermanentError) as e:
        v.BaseModelInfo.from_pretrained_dir(d)
    assert e.value.reason == v.BASE_MODEL_INCONSISTENT and "q_proj" in e.value.message


def test_unsupported_base_model(tmp_path: Path) -> None:
    with pytest.raises(PermanentError) as e:
        v.BaseModelInfo.from_pretrained_dir(adapters.write_base_config(tmp_path / "b", model_type="gpt2"))
    assert e.value.reason == v.UNSUPPORTED_BASE_MODEL and "gpt2" in e.value.message


@pytest.mark.slow
def test_peft_made_adapter_on_a_real_checkpoint(tmp_path: Path) -> None:
    """PEFT's own save_pretrained output, against a real tiny checkpoint (shapes cross-checked)."""
    from support import models  # torch and peft: imported only by this test

    base_dir = models.make_tiny_llama(tmp_path / "base")
    out = models.make_peft_adapter(base_dir, tmp_path / "a", r=8, alpha=16, rank_pattern={"q_proj": 4},
                                   layers_to_transform=[1])  # fmt: skip
    base = v.BaseModelInfo.from_pretrained_dir(base_dir)
    s = v.validate_adapter(out, base, max_lora_rank=8)
    assert s.rank == 8 and s.layers == (1,) and s.target_modules == tuple(sorted(models.ALL_PROJECTIONS))
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(out, base, max_lora_rank=4)
    assert e.value.reason == v.RANK_TOO_LARGE


# --- the CLI ---------------------------------------------------------------------------------------
def test_cli_accepts_a_good_adapter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = adapters.write_base_config(tmp_path / "b")
    d = adapters.write_adapter(tmp_path / "a")
    assert v.main([str(d), "--base-model", str(b), "--max-lora-rank", "8"]) == 0
    out = capsys.readouterr().out
    assert "OK: rank 8" in out and "hidden_size 64" in out and "sha256" in out


def test_cli_refuses_with_every_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = adapters.write_base_config(tmp_path / "b")
    d = adapters.write_adapter(tmp_path / "a", r=32, config={"use_dora": True})
    assert v.main([str(d), "--base-model", str(b), "--max-lora-rank", "16", "--max-length", "4096"]) == 1
    err = capsys.readouterr().err
    for reason in (v.RANK_TOO_LARGE, v.DORA_NOT_SUPPORTED, v.CONTEXT_TOO_LONG):
        assert reason in err


def test_cli_cannot_check_without_a_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    assert v.main([str(d), "--base-model", str(tmp_path / "nowhere")]) == 2
    assert "config.json does not exist" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    b = adapters.write_base_config(tmp_path / "b")
    d = adapters.write_adapter(tmp_path / "a", target_modules=("q_proj", "nope_proj"))
    r = subprocess.run([sys.executable, "-m", "loraplane.worker.validate", str(d), "--base-model", str(b)],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 1 and "UnknownTargetModule" in r.stderr and "nope_proj" in r.stderr


@pytest.mark.parametrize("fields", [
    {"layers_to_transform": ["zero"]},
    {"layers_to_transform": {"a": 1}},
    {"modules_to_save": 7},
    {"rank_pattern": {"q_proj": "big"}},
    {"target_modules": 12},
    {"r": "eight"},
    {"lora_alpha": None},
    {"rank_pattern": ["q_proj"]},
], ids=lambda f: "-".join(f"{k}={v!r}" for k, v in f.items()))  # fmt: skip
def test_fields_of_the_wrong_type_are_a_named_failure_not_a_crash(
    tmp_path: Path, base: v.BaseModelInfo, fields
) -> None:
    d = adapters.write_adapter(tmp_path / "a", config=fields)
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == v.MALFORMED_CONFIG and "adapter_config.json" in e.value.message


def test_validation_failures_are_counted_by_reason(tmp_path: Path, base: v.BaseModelInfo) -> None:
    from prometheus_client import REGISTRY

    def count() -> float:
        return (
            REGISTRY.get_sample_value(
                "loraplane_worker_validation_failures_total", {"reason": v.RANK_TOO_LARGE}
            )
            or 0.0
        )

    before = count()
    with pytest.raises(ValidationFailed):
        v.validate_adapter(adapters.write_adapter(tmp_path / "a", r=32), base, max_lora_rank=16)
    assert count() == before + 1


def test_the_data_path_stays_free_of_torch() -> None:
    """The operator image and the validate CLI stay light: resolving, caching and validating never import torch."""
    code = (
        "import sys\n"
        "import loraplane.worker.validate, loraplane.worker.cache, loraplane.worker.sources\n"
        "import loraplane.worker.hub, loraplane.worker.s3, loraplane.worker.basemodel\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
