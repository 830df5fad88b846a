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

from loraplane.errors import PermanentError, ValidationFailed
from loraplane.worker import validate as v
from loraplane.worker.inference import basemodel as bm
from loraplane.worker.inference import peft as a
from loraplane.worker.inference.basemodel import ModelConfig

L0Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def base(tmp_path: Path) -> ModelConfig:
    return ModelConfig.from_dir(adapters.write_base_config(tmp_path / "base"))


# --- good adapters ---------------------------------------------------------------------------------
def test_good_adapter_summary(tmp_path: Path, base: ModelConfig) -> None:
    d = adapters.write_adapter(tmp_path / "a", r=8, alpha=16, target_modules=adapters.ATTN + adapters.MLP)
    s = v.validate_adapter(d, base, max_lora_rank=16)
    assert (s.rank, s.alpha, s.scaling, s.use_rslora) == (8, 16.0, 2.0, False)
    assert s.target_modules == tuple(sorted(adapters.ATTN + adapters.MLP))
    assert s.sha256 == hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert s.size_bytes == sum(p.stat().st_size for p in d.iterdir())
    assert s.num_tensors == 2 * 2 * 7 and s.layers == (0, 1) and s.warnings == ()


def test_rslora_scaling(tmp_path: Path, base: ModelConfig) -> None:
    d = adapters.write_adapter(tmp_path / "a", r=16, alpha=8, config={"use_rslora": True})
    s = v.validate_adapter(d, base, max_lora_rank=16)
    assert s.use_rslora and s.scaling == pytest.approx(8 / math.sqrt(16))


def test_rank_pattern_and_layers_to_transform_are_honoured(tmp_path: Path, base: ModelConfig) -> None:
    d = adapters.write_adapter(
        tmp_path / "a", r=4, ranks={"q_proj": 8}, layers=(1,),
        config={"rank_pattern": {"q_proj": 8}, "layers_to_transform": [1]},
    )  # fmt: skip
    s = v.validate_adapter(d, base, max_lora_rank=8)
    assert s.rank == 8 and s.layers == (1,)


def test_base_model_name_mismatch_is_a_warning(tmp_path: Path, base: ModelConfig) -> None:
    d = adapters.write_adapter(tmp_path / "a", config={"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"})
    s = v.validate_adapter(d, base, max_lora_rank=16, served_model="mistralai/Mistral-7B-v0.1")
    assert (
        len(s.warnings) == 1 and "meta-llama/Llama-2-7b-hf" in s.warnings[0] and "Mistral-7B" in s.warnings[0]
    )
    same = v.validate_adapter(d, base, max_lora_rank=16, served_model="meta-llama/Llama-2-7b-hf")
    assert same.warnings == ()


# --- the bad-adapter matrix ------------------------------------------------------------------------
# (id, write_adapter keywords, validate keywords, expected reason, fragment of the message)
ERROR_CASES: list[tuple[str, dict[str, Any], dict[str, Any], str, str]] = [
    ("wrong-hidden-size", {"base": {"hidden_size": 128}}, {}, a.SHAPE_MISMATCH, "hidden_size 64"),
    ("gqa-shapes-of-an-mha-model", {"base": {"num_key_value_heads": 4}, "target_modules": ("k_proj",)}, {},
     a.SHAPE_MISMATCH, "k_proj gives 32 outputs"),
    ("rank-above-maximum", {"r": 32, "alpha": 32}, {"max_lora_rank": 16}, a.RANK_TOO_LARGE,
     "rank 32 is above this worker's maxLoraRank 16"),
    ("rank-pattern-above-maximum", {"r": 8, "ranks": {"v_proj": 32}, "config": {"rank_pattern": {"v_proj": 32}}},
     {"max_lora_rank": 16}, a.RANK_TOO_LARGE, "rank 32 (rank_pattern)"),
    ("rank-differs-from-config", {"r": 8, "config": {"r": 4}}, {}, a.SHAPE_MISMATCH, "adapter_config.json gives"),
    ("unknown-target-module", {"target_modules": ("q_proj", "c_attn")}, {}, a.UNKNOWN_TARGET_MODULE, "'c_attn'"),
    ("dora-in-config", {"config": {"use_dora": True}}, {}, a.DORA_NOT_SUPPORTED, "DoRA"),
    ("pissa-init", {"config": {"init_lora_weights": "pissa_niter_4"}}, {}, a.UNSUPPORTED_FEATURE,
     "path_initial_model_for_weight_conversion"),
    ("dora-magnitude-tensor", {"extra_tensors": {f"{L0Q}.lora_magnitude_vector.weight": (64,)}}, {},
     a.DORA_NOT_SUPPORTED, "magnitude"),
    ("bias-in-config", {"config": {"bias": "lora_only"}}, {}, a.BIAS_NOT_SUPPORTED, "bias='none'"),
    ("bias-tensor", {"extra_tensors": {f"{L0Q}.lora_B.bias": (64,)}}, {}, a.BIAS_NOT_SUPPORTED, "LoRA bias"),
    ("modules-to-save", {"config": {"modules_to_save": ["score"]}}, {}, a.MODULES_TO_SAVE_NOT_SUPPORTED, "'score'"),
    ("saved-module-tensor", {"extra_tensors": {"base_model.model.score.weight": (2, 64)}}, {},
     a.MODULES_TO_SAVE_NOT_SUPPORTED, "score.weight"),
    ("lm-head-in-modules-to-save", {"config": {"modules_to_save": ["lm_head"]}}, {},
     a.EMBEDDING_CHANGE_NOT_SUPPORTED, "lm_head"),
    ("embedding-lora", {"extra_tensors": {"base_model.model.model.embed_tokens.lora_embedding_A": (8, 300)}}, {},
     a.EMBEDDING_CHANGE_NOT_SUPPORTED, "embed_tokens"),
    ("layers-to-transform-out-of-range", {"config": {"layers_to_transform": [5]}}, {}, a.LAYER_OUT_OF_RANGE,
     "layer 5"),
    ("tensor-beyond-last-layer", {"layers": (0, 1, 2)}, {}, a.LAYER_OUT_OF_RANGE, "layer 2"),
    ("tensor-outside-layers-to-transform", {"config": {"layers_to_transform": [0]}}, {}, a.LAYER_OUT_OF_RANGE,
     "outside layers_to_transform [0]"),
    ("context-too-long", {}, {"max_length": 1024}, v.CONTEXT_TOO_LONG, "maxLength 1024 is beyond the 256 tokens"),
    ("not-lora", {"config": {"peft_type": "IA3"}}, {}, a.UNSUPPORTED_ADAPTER_TYPE, "'IA3'"),
    ("target-parameters", {"config": {"target_parameters": ["experts"]}}, {}, a.UNSUPPORTED_FEATURE, "MoE experts"),
    ("lora-a-without-b", {"extra_tensors": {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": (8, 64)}},
     {}, a.INCOMPLETE_PAIR, "up_proj has lora_A but no lora_B"),
    ("module-outside-the-layers", {"extra_tensors": {"base_model.model.model.layers.0.extra.q_proj.lora_A.weight": (8, 64),
                                                     "base_model.model.model.layers.0.extra.q_proj.lora_B.weight": (64, 8)}},
     {}, a.UNKNOWN_TARGET_MODULE, "layers.0.extra.q_proj"),
    ("lm-head-in-target-modules", {"config": {"target_modules": ["q_proj", "lm_head"]}}, {},
     a.EMBEDDING_CHANGE_NOT_SUPPORTED, "lm_head"),
    ("no-lora-tensors", {"target_modules": ()}, {}, a.NO_LORA_WEIGHTS, "no lora_A"),
]  # fmt: skip


@pytest.mark.parametrize(("adapter_kw", "validate_kw", "reason", "fragment"),
                         [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])  # fmt: skip
def test_bad_adapter(tmp_path: Path, base: ModelConfig, adapter_kw, validate_kw, reason, fragment) -> None:
    good = adapters.write_adapter(tmp_path / "good")
    bad = adapters.write_adapter(tmp_path / "bad", **adapter_kw)
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(bad, base, **{"max_lora_rank": 16, **validate_kw})
    reasons = [r for r, _ in e.value.problems]
    assert reason in reasons, e.value.problems
    assert fragment in e.value.message, e.value.message
    v.validate_adapter(good, base, max_lora_rank=16)  # the good one stays valid beside it


def test_every_problem_is_reported_at_once(tmp_path: Path, base: ModelConfig) -> None:
    d = adapters.write_adapter(tmp_path / "a", r=32, config={"use_dora": True, "bias": "all"}, layers=(0, 7))
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16, max_length=10_000)
    reasons = {r for r, _ in e.value.problems}
    assert {a.RANK_TOO_LARGE, a.DORA_NOT_SUPPORTED, a.BIAS_NOT_SUPPORTED, a.LAYER_OUT_OF_RANGE,
            v.CONTEXT_TOO_LONG} <= reasons  # fmt: skip


# --- files that must not be trusted ----------------------------------------------------------------
def test_truncated_safetensors_names_the_file(tmp_path: Path, base: ModelConfig) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    w = d / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == a.TRUNCATED_WEIGHTS and "adapter_model.safetensors" in e.value.message


@pytest.mark.parametrize(("content", "reason", "fragment"), [
    (b"\x01\x02", a.TRUNCATED_WEIGHTS, "too short"),
    (struct.pack("<Q", 1 << 40) + b"{}", a.HEADER_TOO_LARGE, "1099511627776-byte header"),
    (struct.pack("<Q", 4096) + b'{"a": 1}', a.TRUNCATED_WEIGHTS, "4096-byte header"),
    (struct.pack("<Q", 5) + b"{nope", a.MALFORMED_WEIGHTS, "unreadable safetensors header"),
], ids=["four-bytes", "enormous-header", "header-beyond-file", "header-not-json"])  # fmt: skip
def test_hostile_safetensors_headers(tmp_path: Path, base: ModelConfig, content, reason, fragment) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    (d / "adapter_model.safetensors").write_bytes(content)
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert (
        e.value.reason == reason
        and fragment in e.value.message
        and "adapter_model.safetensors" in e.value.message
    )


def test_malformed_config_names_the_file(tmp_path: Path, base: ModelConfig) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text('{"r": 8,')
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == a.MALFORMED_CONFIG and "adapter_config.json is not valid JSON" in e.value.message


def test_oversized_config_is_not_read(tmp_path: Path, base: ModelConfig) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "pad": "x" * (2 << 20)}))
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == bm.TOO_LARGE and "limit" in e.value.message


class _Boom:
    """Unpickling this writes a marker file: proof that a .bin was (wrongly) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "unpickled!"))


def test_pickled_weights_are_refused_never_unpickled(tmp_path: Path, base: ModelConfig) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    (d / "adapter_model.safetensors").unlink()
    marker = tmp_path / "marker"
    (d / "adapter_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(PermanentError) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == a.PICKLE_REFUSED and "adapter_model.bin" in e.value.message
    assert not marker.exists()


def test_missing_files(tmp_path: Path, base: ModelConfig) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    (d / "adapter_config.json").unlink()
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == bm.FILE_MISSING and "adapter_config.json" in e.value.message
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(PermanentError) as e2:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e2.value.reason == bm.FILE_MISSING and "adapter_model.safetensors" in e2.value.message


# --- the base model --------------------------------------------------------------------------------
@pytest.mark.parametrize(("rope", "expected"), [
    (None, 256),
    ({"rope_type": "linear", "factor": 4.0}, 1024),
    ({"type": "dynamic", "factor": 2.0}, 512),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}, 256),
], ids=["none", "linear", "dynamic", "llama3"])  # fmt: skip
def test_effective_max_length_under_rope_scaling(tmp_path: Path, rope, expected) -> None:
    info = ModelConfig.from_dir(adapters.write_base_config(tmp_path / "b", rope_scaling=rope))
    assert info.max_length == expected
    # transformers 5 writes rope_parameters (theta included) instead of rope_scaling: the same answer.
    params = {"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}
    info5 = ModelConfig.from_dir(adapters.write_base_config(tmp_path / "b5", rope_parameters=params))
    assert info5.max_length == expected and info5.rope_scaling == info.rope_scaling


def test_rope_scaling_the_engine_cannot_run_is_refused(tmp_path: Path) -> None:
    """yarn used to pass validation (with a longer max length) and then fail at engine load."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    with pytest.raises(PermanentError) as e:
        ModelConfig.from_dir(adapters.write_base_config(tmp_path / "b", rope_scaling=rope))
    assert e.value.reason == bm.UNSUPPORTED_ROPE_SCALING and "'yarn'" in e.value.message


def test_context_too_long_names_both_numbers_under_rope_scaling(tmp_path: Path) -> None:
    cfg = adapters.write_base_config(tmp_path / "b", rope_scaling={"rope_type": "linear", "factor": 4.0})
    base = ModelConfig.from_dir(cfg)
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
    info = ModelConfig.from_dir(adapters.write_base_config(tmp_path / "b"))
    assert info.linear_shapes == adapters.dims(adapters.BASE_CONFIG)
    assert info.linear_shapes["k_proj"] == (64, 32)


def test_checkpoint_that_disagrees_with_its_config_is_refused(tmp_path: Path) -> None:
    d = adapters.write_base_config(tmp_path / "b")
    save_file(
        {"model.layers.0.self_attn.q_proj.weight": np.zeros((32, 64), np.float32)},
        str(d / "model.safetensors"),
    )
    with pytest.raises(PermanentError) as e:
        ModelConfig.from_dir(d)
    assert e.value.reason == bm.BASE_MODEL_INCONSISTENT and "q_proj" in e.value.message


def test_unsupported_base_model(tmp_path: Path) -> None:
    with pytest.raises(PermanentError) as e:
        ModelConfig.from_dir(adapters.write_base_config(tmp_path / "b", model_type="gpt2"))
    assert e.value.reason == bm.UNSUPPORTED_BASE_MODEL and "gpt2" in e.value.message


@pytest.mark.slow
def test_peft_made_adapter_on_a_real_checkpoint(tmp_path: Path) -> None:
    """PEFT's own save_pretrained output, against a real tiny checkpoint (shapes cross-checked)."""
    from support import models  # torch and peft: imported only by this test

    base_dir = models.make_tiny_llama(tmp_path / "base")
    out = models.make_peft_adapter(base_dir, tmp_path / "a", r=8, alpha=16, rank_pattern={"q_proj": 4},
                                   layers_to_transform=[1])  # fmt: skip
    base = ModelConfig.from_dir(base_dir)
    s = v.validate_adapter(out, base, max_lora_rank=8)
    assert s.rank == 8 and s.layers == (1,) and s.target_modules == tuple(sorted(models.ALL_PROJECTIONS))
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(out, base, max_lora_rank=4)
    assert e.value.reason == a.RANK_TOO_LARGE


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
    for reason in (a.RANK_TOO_LARGE, a.DORA_NOT_SUPPORTED, v.CONTEXT_TOO_LONG):
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
    {"rank_pattern": {"q_proj": 0}},
    {"alpha_pattern": {"q_proj": "NaN"}},
    {"rank_pattern": {"(q_proj": 8}},
], ids=lambda f: "-".join(f"{k}={v!r}" for k, v in f.items()))  # fmt: skip
def test_fields_of_the_wrong_type_are_a_named_failure_not_a_crash(
    tmp_path: Path, base: ModelConfig, fields
) -> None:
    d = adapters.write_adapter(tmp_path / "a", config=fields)
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == a.MALFORMED_CONFIG and "adapter_config.json" in e.value.message


def test_validation_failures_are_counted_by_reason(tmp_path: Path, base: ModelConfig) -> None:
    from prometheus_client import REGISTRY

    def count() -> float:
        return (
            REGISTRY.get_sample_value(
                "loraplane_worker_validation_failures_total", {"reason": a.RANK_TOO_LARGE}
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
        "import loraplane.worker.sources.hub, loraplane.worker.sources.s3, loraplane.worker.inference.basemodel\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


# --- one reader for validation and the engine ------------------------------------------------------
def _raw_safetensors(
    path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]], tail: bytes = b""
) -> None:
    """A safetensors file written by hand (any dtype, any bytes), optionally with bytes after the data."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(t[2] for t in tensors.values()) + tail)


def _lora_pair(
    dtype: str, fill: bytes, width: int, r: int = 8
) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    a_key, b_key = adapters.lora_key(0, "q_proj", "lora_A"), adapters.lora_key(0, "q_proj", "lora_B")
    return {a_key: (dtype, (r, 64), fill * (r * 64)), b_key: (dtype, (64, r), bytes(width) * (64 * r))}


NAN_INF = {  # dtype -> (width, NaN, +Inf, the largest finite value), little-endian
    "F32": (4, struct.pack("<f", math.nan), struct.pack("<f", math.inf), struct.pack("<f", 3.4e38)),
    "F16": (2, b"\x00\x7e", b"\x00\x7c", b"\xff\x7b"),
    "BF16": (2, b"\xc0\x7f", b"\x80\x7f", b"\x7f\x7f"),
    "F64": (8, struct.pack("<d", math.nan), struct.pack("<d", -math.inf), struct.pack("<d", 1.7e308)),
}


@pytest.mark.parametrize("dtype", list(NAN_INF))
def test_non_finite_weights_are_refused_and_large_finite_ones_are_not(
    tmp_path: Path, base: ModelConfig, dtype: str
) -> None:
    width, nan, inf, big = NAN_INF[dtype]
    d = adapters.write_adapter(tmp_path / "a", target_modules=("q_proj",), layers=(0,))
    w = d / "adapter_model.safetensors"
    _raw_safetensors(w, _lora_pair(dtype, big, width))
    # The largest finite value is not NaN / Inf; where A x overflows float32 it is another problem.
    try:
        assert v.validate_adapter(d, base, max_lora_rank=16).rank == 8
    except ValidationFailed as e:
        assert dtype != "F16" and e.problems[0][0] == a.UNREPRESENTABLE_WEIGHTS, e.problems
    for bad in (nan, inf):
        pair = _lora_pair(dtype, big, width)
        name, (dt, shape, data) = next(iter(pair.items()))
        pair[name] = (dt, shape, data[: -width * 3] + bad + data[-width * 2 :])  # one value, near the end
        _raw_safetensors(w, pair)
        with pytest.raises(ValidationFailed) as e:
            v.validate_adapter(d, base, max_lora_rank=16)
        assert e.value.problems == [(a.NON_FINITE_WEIGHTS, f"tensor {name} holds NaN or Inf values; "
                                                           "the adapter diverged in training")]  # fmt: skip


def _filled(d: Path, a_value: float, b_value: float, dtype: str = "F32", r: int = 8) -> None:
    """q_proj of layer 0 (hidden 64) with every lora_A value ``a_value`` and every lora_B value ``b_value``."""
    np_dtype = {"F32": np.float32, "F16": np.float16, "F64": np.float64}[dtype]
    save_file({
        adapters.lora_key(0, "q_proj", "lora_A"): np.full((r, 64), a_value, dtype=np_dtype),
        adapters.lora_key(0, "q_proj", "lora_B"): np.full((64, r), b_value, dtype=np_dtype),
    }, str(d / "adapter_model.safetensors"))  # fmt: skip


@pytest.mark.parametrize("serving", ["float16", "bfloat16", "float32"])
def test_an_update_that_overflows_the_serving_dtype_is_refused(
    tmp_path: Path, base: ModelConfig, serving: str
) -> None:
    """Every weight 3e19: finite in the file, so the NaN / Inf scan passes it; B A x overflows any dtype
    (on vLLM such an adapter used to poison every tenant's KV cache)."""
    d = adapters.write_adapter(tmp_path / "a", r=8, alpha=16, target_modules=("q_proj",), layers=(0,))
    _filled(d, 3e19, 3e19)
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16, dtype=serving)
    (reason, message), *_ = e.value.problems
    assert reason == a.UNREPRESENTABLE_WEIGHTS == "UnrepresentableWeights"
    assert f"model.layers.0.self_attn.q_proj overflows {serving}" in message and "lora_A" in message, message


def test_the_bound_depends_on_the_serving_dtype_and_on_the_product(tmp_path: Path, base: ModelConfig) -> None:
    d = adapters.write_adapter(tmp_path / "a", r=8, alpha=16, target_modules=("q_proj",), layers=(0,))
    # scaling 2 x (64 x 4) x (8 x 32) = 131072 for inputs of magnitude 1: beyond float16 (65504) only.
    _filled(d, 4.0, 32.0, dtype="F16")
    assert v.validate_adapter(d, base, max_lora_rank=16, dtype="float32").rank == 8
    assert v.validate_adapter(d, base, max_lora_rank=16, dtype="bfloat16").rank == 8
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16, dtype="float16")
    assert e.value.reason == a.UNREPRESENTABLE_WEIGHTS and "1.31e+05" in e.value.message, e.value.message
    # A quarter of that fits float16; huge A with a tiny B is fine too (the product is what is applied) ...
    _filled(d, 1.0, 32.0, dtype="F16")
    assert v.validate_adapter(d, base, max_lora_rank=16, dtype="float16").rank == 8
    _filled(d, 1e15, 1e-15)
    assert v.validate_adapter(d, base, max_lora_rank=16, dtype="float32").rank == 8
    # ... unless A x alone overflows (the rank-space values the engine holds between A and B).
    _filled(d, 1e18, 1e-30)
    with pytest.raises(ValidationFailed):
        v.validate_adapter(d, base, max_lora_rank=16, dtype="float32")


def test_the_cli_checks_the_narrowest_dtype_by_default(tmp_path: Path) -> None:
    base_dir = adapters.write_base_config(tmp_path / "base")
    d = adapters.write_adapter(tmp_path / "a", r=8, alpha=16, target_modules=("q_proj",), layers=(0,))
    _filled(d, 4.0, 32.0, dtype="F16")
    assert v.main([str(d), "--base-model", str(base_dir)]) == 1
    assert v.main([str(d), "--base-model", str(base_dir), "--dtype", "bfloat16"]) == 0


@pytest.mark.parametrize(("dtype", "width"), [("I8", 1), ("BOOL", 1), ("U16", 2), ("F8_E4M3", 1)])
def test_weights_that_are_not_floats_are_refused(
    tmp_path: Path, base: ModelConfig, dtype: str, width: int
) -> None:
    d = adapters.write_adapter(tmp_path / "a", target_modules=("q_proj",), layers=(0,))
    _raw_safetensors(d / "adapter_model.safetensors", _lora_pair(dtype, b"\x01" * width, width))
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    assert e.value.reason == a.UNSUPPORTED_DTYPE and dtype in e.value.message


def _trailing_bytes(d: Path) -> None:
    with open(d / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0" * 16)


def _gap(d: Path) -> None:
    _raw_safetensors(d / "adapter_model.safetensors", {
        adapters.lora_key(0, "q_proj", "lora_A"): ("F32", (8, 64), bytes(4 * 8 * 64)),
        adapters.lora_key(0, "q_proj", "lora_B"): ("F32", (64, 8), bytes(4 * 8 * 64)),
    })  # fmt: skip
    raw = (d / "adapter_model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    for entry in header.values():
        entry["data_offsets"] = [x + 4 for x in entry["data_offsets"]]
    new = json.dumps(header).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + bytes(4) + raw[8 + n :])


def _nested_config(d: Path) -> None:
    (d / "adapter_config.json").write_text('{"r": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _nested_header(d: Path) -> None:
    raw = ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)


def _int8_weights(d: Path) -> None:
    _raw_safetensors(d / "adapter_model.safetensors", _lora_pair("I8", b"\x01", 1))


def _nan_weights(d: Path) -> None:
    _raw_safetensors(d / "adapter_model.safetensors", _lora_pair("F32", struct.pack("<f", math.nan), 4))


def _a_without_b(d: Path) -> None:
    key = adapters.lora_key(0, "q_proj", "lora_A")
    _raw_safetensors(d / "adapter_model.safetensors", {key: ("F32", (8, 64), bytes(4 * 8 * 64))})


# Each of these used to pass validation (Ready) and then fail at load, or crash with a bare error:
# validation and the engine's loader must now refuse them with the same reason and message.
DRIFT_CASES: list[tuple[str, Any, str, str]] = [
    ("bytes-after-the-last-tensor", _trailing_bytes, a.MALFORMED_WEIGHTS, "file not fully covered"),
    ("gap-between-tensors", _gap, a.MALFORMED_WEIGHTS, "unused bytes"),
    ("deeply-nested-config", _nested_config, a.MALFORMED_CONFIG, "adapter_config.json is not valid JSON"),
    ("deeply-nested-header", _nested_header, a.MALFORMED_WEIGHTS, "unreadable safetensors header"),
    ("int8-weights", _int8_weights, a.UNSUPPORTED_DTYPE, "is I8"),
    ("nan-weights", _nan_weights, a.NON_FINITE_WEIGHTS, "NaN or Inf"),
    ("lora-a-without-b", _a_without_b, a.INCOMPLETE_PAIR, "q_proj has lora_A but no lora_B"),
    ("config-not-json", lambda d: (d / "adapter_config.json").write_text("{"), a.MALFORMED_CONFIG, "not valid JSON"),
    ("module-path-the-engine-has-not", lambda d: _raw_safetensors(d / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.gate_proj.lora_A.weight": ("F32", (8, 64), bytes(4 * 8 * 64)),
        "base_model.model.model.layers.0.self_attn.gate_proj.lora_B.weight": ("F32", (128, 8), bytes(4 * 8 * 128)),
    }), a.UNKNOWN_TARGET_MODULE, "self_attn.gate_proj"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("damage", "reason", "fragment"), [c[1:] for c in DRIFT_CASES], ids=[c[0] for c in DRIFT_CASES]
)
def test_validation_and_the_engine_loader_refuse_alike(
    tmp_path: Path, damage, reason: str, fragment: str
) -> None:
    from loraplane.worker.builtin.runner import load_adapter_weights  # torch: only this test

    base_dir = adapters.write_base_config(tmp_path / "base")
    base = ModelConfig.from_dir(base_dir)
    d = adapters.write_adapter(tmp_path / "a")
    damage(d)
    with pytest.raises(PermanentError) as at_validation:
        v.validate_adapter(d, base, max_lora_rank=16)
    with pytest.raises(PermanentError) as at_load:
        load_adapter_weights(d, base, adapter_id=1)
    assert at_validation.value.reason == reason and fragment in at_validation.value.message, (
        at_validation.value
    )
    assert (at_load.value.reason, at_load.value.message) == (reason, at_validation.value.message)


@pytest.mark.slow
def test_alpha_pattern_is_served_as_peft_scales_it(tmp_path: Path) -> None:
    """alpha_pattern used to be refused by validation while the engine served it right: both serve it now,
    and the loader's effective per-module scaling is PEFT's own."""
    import torch
    from peft import PeftModel
    from support import models
    from transformers import AutoModelForCausalLM

    from loraplane.worker.builtin.runner import load_adapter_weights

    base_dir = models.make_tiny_llama(tmp_path / "base")
    out = models.make_peft_adapter(base_dir, tmp_path / "a", r=4, alpha=8, rank_pattern={"q_proj": 8},
                                   alpha_pattern={"down_proj": 32, "q_proj": 2})  # fmt: skip
    base = ModelConfig.from_dir(base_dir)
    s = v.validate_adapter(out, base, max_lora_rank=8)
    assert (s.rank, s.scaling) == (8, 2.0)
    w = load_adapter_weights(out, base, adapter_id=1)
    with models.quiet_peft():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(out))
    for (layer, proj), (lora_a, lora_b) in w.weights.items():
        block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
        module = peft.base_model.model.model.layers[layer].get_submodule(f"{block}.{proj}")
        want = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
        torch.testing.assert_close(w.scaling * lora_b @ lora_a, want.detach(), rtol=1e-6, atol=1e-7)


def test_qwen3_passes_validation_because_the_engine_runs_it(tmp_path: Path) -> None:
    """One table of architectures: what validation accepts, the engine's config reader accepts too
    (qwen3 passed validation and failed at engine load before). Its logits: tests/worker/engine."""
    cfg = ModelConfig.from_dir(adapters.write_base_config(tmp_path / "q3", model_type="qwen3", head_dim=32))
    assert cfg.qk_norm and cfg.linear_shapes["q_proj"] == (64, 128) and set(bm.ARCHITECTURES) >= {"qwen3"}
    d = adapters.write_adapter(tmp_path / "a", base={"head_dim": 32}, target_modules=("q_proj", "o_proj"))
    v.validate_adapter(d, cfg, max_lora_rank=16)


def test_layers_of_mixed_attention_kinds_are_refused(tmp_path: Path) -> None:
    kinds = ["sliding_attention", "full_attention"]
    with pytest.raises(PermanentError) as e:
        ModelConfig.from_dir(
            adapters.write_base_config(tmp_path / "b", model_type="qwen2", layer_types=kinds)
        )
    assert e.value.reason == bm.UNSUPPORTED_BASE_MODEL and "sliding_attention" in e.value.message


# --- the adapter's own chat template ---------------------------------------------------------------
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"


def test_chat_template_is_the_adapters_own_or_the_base_models(tmp_path: Path, base: ModelConfig) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    plain = v.validate_adapter(d, base, max_lora_rank=8)
    assert (plain.chat_template, plain.chat_template_source) == (None, "base model")
    (d / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages }}", "eos_token": "</s>"})
    )
    from_config = v.validate_adapter(d, base, max_lora_rank=8)
    assert (from_config.chat_template, from_config.chat_template_source) == (
        "{{ messages }}",
        "tokenizer_config.json",
    )
    (d / "chat_template.jinja").write_text(TEMPLATE)
    from_file = v.validate_adapter(d, base, max_lora_rank=8)  # the .jinja file wins, as in transformers
    assert (from_file.chat_template, from_file.chat_template_source) == (TEMPLATE, "chat_template.jinja")
    (d / "chat_template.jinja").unlink()
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": TEMPLATE}]
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert v.validate_adapter(d, base, max_lora_rank=8).chat_template == TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))  # no template in it
    assert v.validate_adapter(d, base, max_lora_rank=8).chat_template_source == "base model"


def test_broken_chat_template_fails_the_adapter_with_the_other_problems(
    tmp_path: Path, base: ModelConfig
) -> None:
    d = adapters.write_adapter(tmp_path / "a", r=32)
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ValidationFailed) as e:
        v.validate_adapter(d, base, max_lora_rank=16)
    reasons = dict(e.value.problems)
    assert set(reasons) == {a.RANK_TOO_LARGE, "InvalidChatTemplate"}
    assert (
        "chat_template.jinja" in reasons["InvalidChatTemplate"] and "line 1" in reasons["InvalidChatTemplate"]
    )


def test_cli_says_which_chat_template_an_adapter_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = adapters.write_base_config(tmp_path / "b")
    d = adapters.write_adapter(tmp_path / "a")
    assert v.main([str(d), "--base-model", str(b), "--max-lora-rank", "8"]) == 0
    assert "chat template: the base model" in capsys.readouterr().out
    (d / "chat_template.jinja").write_text(TEMPLATE)
    assert v.main([str(d), "--base-model", str(b), "--max-lora-rank", "8"]) == 0
    assert "chat template: its own, from chat_template.jinja" in capsys.readouterr().out
    assert v.main([str(d), "--base-model", str(b), "--max-lora-rank", "8", "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["chatTemplate"] == "chat_template.jinja"
