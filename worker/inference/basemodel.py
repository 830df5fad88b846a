"""The base model's config.json, read once for validation and the engine alike (no torch, no weights).

``ModelConfig`` is what both need: the Llama-family shapes (GQA included), the architecture's
biases and norms, RoPE and its scaling, the longest context the model reaches. ``ARCHITECTURES``
is the one table of what is served: validation accepts exactly what the engine can run, so a
base model never passes validation and then fails at load. transformers < 5 writes
``rope_scaling`` + ``rope_theta``; 5.x writes ``rope_parameters`` holding both; both are read here.
When the directory also holds the checkpoint, the shapes are cross-checked against its first
safetensors header, so a config that lies is caught before any weight is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplane.errors import PermanentError
from loraplane.worker.inference import tensorfile

MAX_CONFIG_BYTES = 1 << 20
#: the seven LoRA target projections, in layer order, and the block each lives in.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
          "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # fmt: skip
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")

FILE_MISSING = "FileMissing"
TOO_LARGE = "TooLarge"
UNSUPPORTED_BASE_MODEL = "UnsupportedBaseModel"
UNSUPPORTED_ROPE_SCALING = "UnsupportedRopeScaling"
BASE_MODEL_INCONSISTENT = "BaseModelInconsistent"
MODEL_CONFIG_INVALID = "ModelConfigInvalid"


@dataclass(frozen=True)
class Architecture:
    """How one model_type differs from Llama. A str names the config.json flag that turns it on."""

    qkv_bias: bool | str = False
    o_bias: bool | str = False
    mlp_bias: bool | str = False
    qk_norm: bool = False
    """RMSNorm over each head of q and k before RoPE (Qwen3)."""
    sliding_window: bool | str = False


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    "mistral": Architecture(sliding_window=True),
    "qwen2": Architecture(qkv_bias=True, sliding_window="use_sliding_window"),
    "qwen3": Architecture(qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True,
                          sliding_window="use_sliding_window"),
}  # fmt: skip


def _flag(value: bool | str, raw: dict[str, Any]) -> bool:
    return bool(raw.get(value, False)) if isinstance(value, str) else value


@dataclass(frozen=True)
class ModelConfig:
    """The parts of a Hugging Face config.json that validation and the forward need."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool = False
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: str = ""
    """The dtype the checkpoint was saved in (config.json torch_dtype / dtype), "" when not given."""
    name: str = ""
    """The model's name for messages: the served name, else _name_or_path, else the directory."""

    @classmethod
    def from_dir(cls, model_dir: Path, *, name: str | None = None) -> ModelConfig:
        """config.json of a checkpoint directory, cross-checked with its weights when they are there."""
        model_dir = Path(model_dir)
        raw = read_json(model_dir / "config.json", MAX_CONFIG_BYTES, MODEL_CONFIG_INVALID)
        config = cls.from_dict(raw, name=name or str(raw.get("_name_or_path") or model_dir.name))
        config._cross_check(model_dir)
        return config

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, name: str = "") -> ModelConfig:
        model_type = raw.get("model_type", "")
        arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
        if arch is None:
            raise PermanentError(
                UNSUPPORTED_BASE_MODEL,
                f"config.json: model_type {model_type!r} is not supported; use one of {', '.join(ARCHITECTURES)}",
            )
        kinds = set(raw.get("layer_types") or [])
        if len(kinds) > 1:
            raise PermanentError(
                UNSUPPORTED_BASE_MODEL,
                f"config.json: layers of several attention kinds ({sorted(kinds)}) are not supported",
            )
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            params = raw.get("rope_parameters") or {}
            scaling = _rope_scaling(raw.get("rope_scaling") or params)
            window = raw.get("sliding_window") if _flag(arch.sliding_window, raw) else None
            eos = raw.get("eos_token_id")
            config = cls(
                model_type=model_type,
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                vocab_size=int(raw["vocab_size"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=_flag(arch.qkv_bias, raw),
                o_bias=_flag(arch.o_bias, raw),
                mlp_bias=_flag(arch.mlp_bias, raw),
                qk_norm=arch.qk_norm,
                rope_scaling=scaling,
                sliding_window=int(window) if window else None,
                eos_token_id=[]
                if eos is None
                else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos]),
                bos_token_id=raw.get("bos_token_id"),
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or ""),
                name=name,
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise PermanentError(MODEL_CONFIG_INVALID, f"config.json lacks a valid {e}") from e
        if min(config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim,
               config.intermediate_size, config.vocab_size) <= 0:  # fmt: skip
            raise PermanentError(MODEL_CONFIG_INVALID, "config.json: sizes must be positive")
        return config

    def proj_shape(self, proj: str) -> tuple[int, int]:
        """(in_features, out_features) of one target projection."""
        return self.linear_shapes[proj]

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear module name -> (in_features, out_features)."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    @property
    def max_length(self) -> int:
        """Longest context the base reaches: max_position_embeddings under its RoPE scaling (as vLLM
        derives max_model_len; llama3 scaling already states the extended length)."""
        s = self.rope_scaling
        if s and s["rope_type"] in ("linear", "dynamic"):
            return int(self.max_position_embeddings * float(s.get("factor") or 1.0))
        return self.max_position_embeddings

    def _cross_check(self, model_dir: Path) -> None:
        """Compare the shapes derived from config.json with the checkpoint's own header, if it has one."""
        files = sorted(model_dir.glob("model*.safetensors"))
        if not files:
            return
        header = tensorfile.read_header(files[0])
        for proj, (fan_in, fan_out) in self.linear_shapes.items():
            for key, t in header.tensors.items():
                if key.startswith("model.layers.0.") and key.endswith(f".{proj}.weight"):
                    if list(t.shape) != [fan_out, fan_in]:
                        raise PermanentError(
                            BASE_MODEL_INCONSISTENT,
                            f"{files[0]}: {key} is {list(t.shape)} but config.json implies "
                            f"[{fan_out}, {fan_in}]; the checkpoint and its config disagree",
                        )


def _rope_scaling(scaling: dict[str, Any]) -> dict[str, Any] | None:
    """The RoPE scaling as {"rope_type": ..., ...}, None for plain RoPE; refuses what the engine cannot run."""
    if not isinstance(scaling, dict):
        raise TypeError("rope_scaling must be an object")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise PermanentError(
            UNSUPPORTED_ROPE_SCALING,
            f"config.json: RoPE scaling {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}",
        )
    if rope_type == "default":
        return None
    return {**{k: v for k, v in scaling.items() if k != "rope_theta"}, "rope_type": rope_type}


def read_json(path: Path, cap: int, reason: str) -> dict[str, Any]:
    """A size-capped JSON object from a file; ``reason`` names what is wrong when it is not one."""
    if not path.is_file():
        raise PermanentError(FILE_MISSING, f"{path} does not exist")
    size = path.stat().st_size
    if size > cap:
        raise PermanentError(
            TOO_LARGE, f"{path} is {size} bytes, above the {cap}-byte limit for config files"
        )
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise PermanentError(
            reason, f"{path.name} is not valid JSON: {str(e)[:200] or type(e).__name__}"
        ) from e
    if not isinstance(data, dict):
        raise PermanentError(reason, f"{path.name} must hold a JSON object, not {type(data).__name__}")
    return data
