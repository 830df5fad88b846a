"""Minimal PEFT-format adapters and base configs written directly (json + safetensors.numpy, no torch).

Bad adapters are easiest to make by hand: a wrong shape, a DoRA vector, a truncated file. The
shapes here are computed from the config independently of loraplane.worker.validate, so a bug in
the validator's shape table cannot hide behind the same bug in the builder.

write_base_config(dir, **overrides) -> Path   config.json of a tiny Llama (hidden 64, 2 layers)
write_adapter(dir, **kw) -> Path               adapter_config.json + adapter_model.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

BASE_CONFIG: dict[str, Any] = {
    "_name_or_path": "tiny-llama",
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def write_base_config(out_dir: Path, **overrides: Any) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({**BASE_CONFIG, **overrides}))
    return out_dir


def dims(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """module -> (in_features, out_features) for a Llama config."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim", h // heads)
    i = cfg["intermediate_size"]
    return {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip


def lora_key(layer: int, module: str, part: str) -> str:
    block = "self_attn" if module in ATTN else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{module}.{part}.weight"


def write_adapter(
    out_dir: Path,
    *,
    r: int = 8,
    alpha: float = 16,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    layers: tuple[int, ...] = (0, 1),
    base: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    extra_tensors: dict[str, tuple[int, ...]] | None = None,
    ranks: dict[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """An adapter for `base` (default BASE_CONFIG); `config` overrides adapter_config.json fields,
    `ranks` gives per-module ranks (as rank_pattern would), `extra_tensors` adds name -> shape."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {**BASE_CONFIG, **(base or {})}
    shapes = dims(cfg)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for layer in layers:
        for m in target_modules:
            fan_in, fan_out = shapes.get(m, (cfg["hidden_size"], cfg["hidden_size"]))
            rank = (ranks or {}).get(m, r)
            tensors[lora_key(layer, m, "lora_A")] = rng.standard_normal((rank, fan_in), dtype=np.float32)
            tensors[lora_key(layer, m, "lora_B")] = rng.standard_normal((fan_out, rank), dtype=np.float32)
    for name, shape in (extra_tensors or {}).items():
        tensors[name] = np.zeros(shape, dtype=np.float32)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": list(target_modules),
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        **(config or {}),
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out_dir
