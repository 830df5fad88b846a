"""What the worker knows about its base model, from config.json alone (no torch, no weights).

Validation compares every adapter tensor with the base layer it patches, so it needs the shapes of
the Llama-family linears (GQA included), the number of layers, the vocabulary and the longest
context the model reaches under its RoPE scaling. When the directory also holds the checkpoint,
the shapes are cross-checked against its safetensors header, so a config that lies is caught.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplane.crds.errors import PermanentError

MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20  # a LoRA header lists a few hundred tensors: ~100 KiB; 16 MiB is generous
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}  # fmt: skip

FILE_MISSING = "FileMissing"
TOO_LARGE = "TooLarge"
MALFORMED_WEIGHTS = "MalformedWeights"
TRUNCATED_WEIGHTS = "TruncatedWeights"
HEADER_TOO_LARGE = "HeaderTooLarge"
UNSUPPORTED_BASE_MODEL = "UnsupportedBaseModel"
BASE_MODEL_INCONSISTENT = "BaseModelInconsistent"
MODEL_CONFIG_INVALID = "ModelConfigInvalid"


# --- the base model ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaseModelInfo:
    """What validation needs to know about the served base model, from its config.json."""

    name: str
    model_type: str
    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    max_position_embeddings: int
    max_length: int
    """Longest context the base reaches: max_position_embeddings under its RoPE scaling."""
    linear_shapes: dict[str, tuple[int, int]]
    """Per-layer linear module name -> (in_features, out_features)."""
    rope_scaling: dict[str, Any] | None = None

    @classmethod
    def from_pretrained_dir(cls, model_dir: Path, *, served_name: str | None = None) -> BaseModelInfo:
        model_dir = Path(model_dir)
        cfg = read_json(model_dir / "config.json", MAX_CONFIG_BYTES, MODEL_CONFIG_INVALID)
        model_type = str(cfg.get("model_type", ""))
        if model_type not in LLAMA_FAMILY:
            raise PermanentError(
                UNSUPPORTED_BASE_MODEL,
                f"{model_dir}/config.json: model_type {model_type!r} is not supported; use one of {LLAMA_FAMILY}",
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            kv_heads = int(cfg.get("num_key_value_heads") or heads)
            head_dim = int(cfg.get("head_dim") or hidden // heads)
            inter = int(cfg["intermediate_size"])
            layers = int(cfg["num_hidden_layers"])
            vocab = int(cfg["vocab_size"])
            max_pos = int(cfg.get("max_position_embeddings", 2048))
        except (KeyError, TypeError, ValueError) as e:
            raise PermanentError(MODEL_CONFIG_INVALID, f"{model_dir}/config.json lacks a valid {e}") from e
        shapes = {
            "q_proj": (hidden, heads * head_dim),
            "k_proj": (hidden, kv_heads * head_dim),
            "v_proj": (hidden, kv_heads * head_dim),
            "o_proj": (heads * head_dim, hidden),
            "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter),
            "down_proj": (inter, hidden),
        }
        rope = cfg.get("rope_scaling") if isinstance(cfg.get("rope_scaling"), dict) else None
        info = cls(
            name=served_name or str(cfg.get("_name_or_path") or model_dir.name),
            model_type=model_type,
            architecture=str((cfg.get("architectures") or [""])[0]),
            hidden_size=hidden,
            num_layers=layers,
            vocab_size=vocab,
            max_position_embeddings=max_pos,
            max_length=effective_max_length(max_pos, rope),
            linear_shapes=shapes,
            rope_scaling=rope,
        )
        info._cross_check(model_dir)
        return info

    def _cross_check(self, model_dir: Path) -> None:
        """Compare the shapes derived from config.json with the checkpoint's own headers, if it has one."""
        files = sorted(model_dir.glob("model*.safetensors"))
        if not files:
            return
        header = read_safetensors_header(files[0])
        for name, (fan_in, fan_out) in self.linear_shapes.items():
            for key, meta in header.items():
                if key.startswith("model.layers.0.") and key.endswith(f".{name}.weight"):
                    if list(meta.get("shape", [])) != [fan_out, fan_in]:
                        raise PermanentError(
                            BASE_MODEL_INCONSISTENT,
                            f"{files[0]}: {key} is {meta.get('shape')} but config.json implies "
                            f"[{fan_out}, {fan_in}]; the checkpoint and its config disagree",
                        )


def effective_max_length(max_position_embeddings: int, rope_scaling: dict[str, Any] | None) -> int:
    """The context the base reaches under its RoPE scaling (as vLLM derives max_model_len)."""
    if not rope_scaling:
        return max_position_embeddings
    kind = str(rope_scaling.get("rope_type") or rope_scaling.get("type") or "default")
    factor = float(rope_scaling.get("factor") or 1.0)
    if kind in (
        "default",
        "llama3",
        "longrope",
        "su",
    ):  # max_position_embeddings already is the extended length
        return max_position_embeddings
    if kind == "yarn":
        original = int(rope_scaling.get("original_max_position_embeddings") or max_position_embeddings)
        return int(original * factor)
    return int(max_position_embeddings * factor)  # linear, dynamic


# --- files ---------------------------------------------------------------------------------------
def read_json(path: Path, cap: int, reason: str) -> dict[str, Any]:
    if not path.is_file():
        raise PermanentError(FILE_MISSING, f"{path} does not exist")
    size = path.stat().st_size
    if size > cap:
        raise PermanentError(
            TOO_LARGE, f"{path} is {size} bytes, above the {cap}-byte limit for config files"
        )
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise PermanentError(reason, f"{path.name} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise PermanentError(reason, f"{path.name} must hold a JSON object, not {type(data).__name__}")
    return data


def read_safetensors_header(path: Path, *, cap: int = MAX_HEADER_BYTES) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file (name -> dtype, shape, data_offsets), checked against its size.

    Raises PermanentError TruncatedWeights / HeaderTooLarge / MalformedWeights naming the file.
    """
    name = path.name
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise PermanentError(TRUNCATED_WEIGHTS, f"{name} is {size} bytes: too short to be safetensors")
        (n,) = struct.unpack("<Q", prefix)
        if n > cap:
            raise PermanentError(
                HEADER_TOO_LARGE,
                f"{name} declares a {n}-byte header, above the {cap}-byte limit; refusing to read it",
            )
        if 8 + n > size:
            raise PermanentError(
                TRUNCATED_WEIGHTS,
                f"{name} declares a {n}-byte header but the file is {size} bytes: it is truncated",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise PermanentError(MALFORMED_WEIGHTS, f"{name} has an unreadable safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise PermanentError(MALFORMED_WEIGHTS, f"{name}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for key, meta in header.items():
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            shape = [int(d) for d in meta["shape"]]
            width = _DTYPE_BYTES[meta["dtype"]]
        except (KeyError, TypeError, ValueError) as e:
            raise PermanentError(
                MALFORMED_WEIGHTS, f"{name}: tensor {key!r} has a malformed entry ({e})"
            ) from e
        if end > data_size:
            raise PermanentError(
                TRUNCATED_WEIGHTS,
                f"{name}: tensor {key!r} ends at byte {end} but only {data_size} data bytes exist: truncated",
            )
        if end - begin != math.prod(shape) * width or begin < 0:
            raise PermanentError(
                MALFORMED_WEIGHTS, f"{name}: tensor {key!r} has offsets that do not match its shape {shape}"
            )
    return header
