"""A Llama-family causal LM forward written from the checkpoint's config.json and safetensors weights.

Serving engines own their forward pass: the batch is ragged (a flat [tokens, hidden] tensor, no
padding), the KV layout is ours (kvcache.py) and the LoRA delta is added inside every target
linear (lora.py). transformers' modules stand in the way of all three, so this module implements
Llama, Mistral, Qwen2 and Qwen3 directly (RMSNorm, RoPE with linear / dynamic / llama3 scaling, GQA,
SwiGLU, Qwen2's qkv bias, Qwen3's per-head q/k norm, tied embeddings) and keeps transformers only as
the test reference. The config comes from basemodel.ModelConfig, the reader validation uses too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from loraplane.errors import PermanentError
from loraplane.worker.inference import tensorfile
from loraplane.worker.inference.basemodel import PROJECTIONS as PROJECTIONS
from loraplane.worker.inference.basemodel import ModelConfig


class Rope:
    """Rotary embedding tables; cos/sin per token from per-token positions (ragged batches)."""

    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        self.dim = config.head_dim
        self.base = config.rope_theta
        self.scaling = config.rope_scaling or {"rope_type": "default"}
        self.kind = self.scaling["rope_type"]
        self.max_pos = config.max_position_embeddings
        inv = 1.0 / (
            self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim)
        )
        if self.kind == "linear":
            inv = inv / float(self.scaling["factor"])
        elif self.kind == "llama3":
            inv = _llama3_inv_freq(inv, self.scaling)
        self.inv_freq = inv.float()

    def cos_sin(
        self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [tokens, head_dim]; ``seq_lens`` (per token) drives dynamic NTK scaling."""
        inv = self.inv_freq
        if self.kind == "dynamic" and seq_lens is not None:
            factor = float(self.scaling["factor"])
            orig = int(self.scaling.get("original_max_position_embeddings") or self.max_pos)
            lens = torch.clamp(seq_lens.to(torch.float64), min=orig)
            base = self.base * ((factor * lens / orig) - (factor - 1)) ** (self.dim / (self.dim - 2))
            expo = torch.arange(0, self.dim, 2, dtype=torch.float64, device=positions.device) / self.dim
            inv_t = (1.0 / (base[:, None] ** expo[None, :])).float()
            freqs = positions.float()[:, None] * inv_t
        else:
            freqs = positions.float()[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _llama3_inv_freq(inv: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(var + eps)).to(x.dtype)


#: The forward's four linears per layer and the projections each one's output concatenates, in
#: column order: q/k/v share their input and so do gate/up, so each pair or triple is one matmul.
LINEARS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}


class LoraHook(Protocol):
    """What the forward calls after each of its linears (``LINEARS``): y += the LoRA delta for x."""

    def add_delta(self, layer: int, linear: str, x: torch.Tensor, y: torch.Tensor) -> None: ...


class AttentionHook(Protocol):
    """What the forward calls for attention: store k/v for the batch's tokens, return attention output."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor  # [q+k+v out, hidden]: one matmul for the three projections
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    q_norm: torch.Tensor | None = None  # [head_dim]: Qwen3's RMSNorm of each q / k head before RoPE
    k_norm: torch.Tensor | None = None


class CausalLM:
    """Weights plus the forward over a flat batch of tokens; no state between calls (that is the KV cache)."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        self.config = config
        self.device = device

        # pop, so that each separate q/k/v (gate/up) tensor is freed once fused: peak memory stays
        # near the weights' size instead of twice it.
        def get(name: str) -> torch.Tensor:
            if name not in tensors:
                raise PermanentError("ModelWeightMissing", f"checkpoint has no tensor {name!r}")
            return tensors.pop(name)

        def opt(name: str) -> torch.Tensor | None:
            return tensors.pop(name, None)

        def cat(names: list[str]) -> torch.Tensor | None:
            parts = [opt(n) for n in names]
            if all(p is None for p in parts):
                return None
            if any(p is None for p in parts):
                raise PermanentError("ModelWeightMissing", f"checkpoint has only some of {names}")
            return torch.cat(parts, dim=0)  # type: ignore[arg-type]

        self.embed = get("model.embed_tokens.weight")
        self.norm = get("model.norm.weight")
        head = opt("lm_head.weight")
        self.lm_head = self.embed if (config.tie_word_embeddings or head is None) else head
        self.layers: list[LayerWeights] = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            self.layers.append(
                LayerWeights(
                    input_norm=get(p + "input_layernorm.weight"),
                    post_norm=get(p + "post_attention_layernorm.weight"),
                    qkv=cat([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]),  # type: ignore[arg-type]
                    qkv_bias=cat([a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"]),
                    o=get(a + "o_proj.weight"),
                    o_bias=opt(a + "o_proj.bias"),
                    gate_up=cat([m + "gate_proj.weight", m + "up_proj.weight"]),  # type: ignore[arg-type]
                    gate_up_bias=cat([m + "gate_proj.bias", m + "up_proj.bias"]),
                    down=get(m + "down_proj.weight"),
                    down_bias=opt(m + "down_proj.bias"),
                    q_norm=get(a + "q_norm.weight") if config.qk_norm else None,
                    k_norm=get(a + "k_norm.weight") if config.qk_norm else None,
                )
            )
        self.rope = Rope(config, device)
        self.dtype = self.embed.dtype

    def tensors(self) -> list[torch.Tensor]:
        """Every weight tensor once (the tied head is the embedding)."""
        out = [self.embed, self.norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        for w in self.layers:
            out.extend(t for t in vars(w).values() if t is not None)
        return out

    @classmethod
    def load(cls, model_dir: Path, *, device: torch.device, dtype: torch.dtype) -> CausalLM:
        config = ModelConfig.from_dir(model_dir)
        return cls(config, load_safetensors(Path(model_dir), device=device, dtype=dtype), device)

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: torch.Tensor,
        last_index: torch.Tensor,
        lora: LoraHook | None,
        attention: AttentionHook,
    ) -> torch.Tensor:
        """Logits [len(last_index), vocab] (float32) at ``last_index`` of the flat token batch.

        token_ids, positions, seq_lens: [tokens]; seq_lens is each token's sequence length after
        this step (for dynamic RoPE).
        """
        c = self.config
        nq, nkv, hd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.head_dim
        inter = c.intermediate_size
        x = F.embedding(token_ids, self.embed)
        cos, sin = self.rope.cos_sin(positions, seq_lens)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        n = x.shape[0]
        for i, w in enumerate(self.layers):
            h = rms_norm(x, w.input_norm, c.rms_norm_eps)
            qkv = F.linear(h, w.qkv, w.qkv_bias)
            if lora is not None:
                lora.add_delta(i, "qkv", h, qkv)
            q, k = qkv[:, :nq].view(n, c.num_heads, hd), qkv[:, nq : nq + nkv].view(n, c.num_kv_heads, hd)
            if w.q_norm is not None and w.k_norm is not None:
                q, k = rms_norm(q, w.q_norm, c.rms_norm_eps), rms_norm(k, w.k_norm, c.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            v = qkv[:, nq + nkv :].view(n, c.num_kv_heads, hd)
            att = attention.attend(i, q, k, v).reshape(n, nq)
            o = F.linear(att, w.o, w.o_bias)
            if lora is not None:
                lora.add_delta(i, "o", att, o)
            x = x + o
            h = rms_norm(x, w.post_norm, c.rms_norm_eps)
            gu = F.linear(h, w.gate_up, w.gate_up_bias)
            if lora is not None:
                lora.add_delta(i, "gate_up", h, gu)
            act = F.silu(gu[:, :inter]) * gu[:, inter:]
            d = F.linear(act, w.down, w.down_bias)
            if lora is not None:
                lora.add_delta(i, "down", act, d)
            x = x + d
        last = x.index_select(0, last_index)
        return F.linear(rms_norm(last, self.norm, c.rms_norm_eps), self.lm_head).float()


def load_safetensors(model_dir: Path, *, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint; never unpickles anything."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise PermanentError(
            "ModelWeightsMissing",
            f"{model_dir} has no model.safetensors or model.safetensors.index.json; "
            "convert the checkpoint to safetensors (pickled .bin weights are refused)",
        )
    out: dict[str, torch.Tensor] = {}
    for name in files:
        if Path(name).name != name:
            raise PermanentError(
                "ModelWeightsInvalid", f"shard name {name!r} in the index is not a plain file name"
            )
        for key, tensor in read_safetensors(model_dir / name):
            out[key] = tensor.to(device=device, dtype=dtype)
    return out


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
MAX_HEADER_BYTES = 100 << 20  # a base checkpoint's shard lists thousands of tensors


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) from one safetensors file, its header checked by tensorfile (as validation does),
    read with plain file reads into fresh tensors.

    Not mmap: the mapped file's pages would count in RSS beside the copies (twice the weights at the
    peak); reading tensor by tensor keeps the peak near the weights' own size.
    """
    header = tensorfile.read_header(path, cap=MAX_HEADER_BYTES)
    with path.open("rb") as f:
        for t in sorted(header.tensors.values(), key=lambda t: t.start):
            dtype = _DTYPES.get(t.dtype)
            if dtype is None:
                raise PermanentError(
                    tensorfile.MALFORMED_WEIGHTS,
                    f"{path}: tensor {t.name} is {t.dtype}; weights must be floats",
                )
            raw = bytearray(t.end - t.start)
            f.seek(t.start)
            if f.readinto(raw) != len(raw):
                raise PermanentError(tensorfile.TRUNCATED_WEIGHTS, f"{path}: tensor {t.name} is truncated")
            buf = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            yield t.name, buf.view(dtype).reshape(t.shape)
