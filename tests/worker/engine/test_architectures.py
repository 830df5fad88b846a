"""Our forward against transformers for the Llama family's variants: Mistral, Qwen2 (qkv bias), Qwen3,
Llama with attention/MLP bias, tied embeddings, no GQA, and each supported rope_scaling type.

fp32 on CPU, atol 1e-4. The prompt (40 tokens) is longer than max_position_embeddings (32) where
dynamic scaling must kick in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support import models

from loraplane.errors import PermanentError
from loraplane.worker.builtin.model import ModelConfig
from loraplane.worker.builtin.runner import ModelRunner, SeqStep

ATOL = 1e-4
VARIANTS: dict[str, dict[str, Any]] = {
    "mistral": dict(arch="mistral"),
    "mistral-sliding-window": dict(arch="mistral", sliding_window=8),
    "qwen2": dict(arch="qwen2"),
    # Qwen3: per-head q/k RMSNorm before RoPE, head_dim not hidden/heads, bias on q, k, v and o.
    "qwen3": dict(arch="qwen3", head_dim=32, attention_bias=True),
    "llama-bias-tied-mha": dict(
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True, num_key_value_heads=4
    ),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope-dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=32),
    "rope-llama3": dict(
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        rope_theta=500000.0,
    ),
}
PROMPT = [1] + [(7 * i + 3) % 250 + 3 for i in range(39)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_transformers(variant: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = models.make_tiny_llama(tmp_path / variant, **VARIANTS[variant])
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    runner = ModelRunner(model_dir, max_seqs=4, max_model_len=64)
    runner.allocate(0)
    runner.allocate(1)
    got = runner.step([SeqStep(0, PROMPT, -1), SeqStep(1, PROMPT[:9], -1)])
    seqs = [list(PROMPT), PROMPT[:9]]
    caches = []
    with torch.no_grad():
        for i in range(2):
            out = ref(input_ids=torch.tensor([seqs[i]]), use_cache=True)
            caches.append(out.cache)
            torch.testing.assert_close(
                got[i], out.logits[0, -1], atol=ATOL, rtol=ATOL, msg=f"{variant} prefill row {i}"
            )
        got = runner.step([SeqStep(0, [5], -1), SeqStep(1, [6], -1)])
        # decode against transformers' own KV cache: with dynamic NTK scaling, keys cached at an
        # earlier length keep their rotation, so a cached decode differs from a full recompute.
        for i, token in enumerate((5, 6)):
            want = ref(input_ids=torch.tensor([[token]]), cache=caches[i], use_cache=True).logits[0, -1]
            torch.testing.assert_close(got[i], want, atol=ATOL, rtol=ATOL, msg=f"{variant} decode row {i}")


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"model_type": "gpt2"}, "UnsupportedBaseModel"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "UnsupportedRopeScaling"),
    ],
)
def test_unsupported_config_is_refused(change: dict[str, Any], reason: str) -> None:
    raw = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=300,
    )
    raw.update(change)
    with pytest.raises(PermanentError) as err:
        ModelConfig.from_dict(raw)
    assert err.value.reason == reason
