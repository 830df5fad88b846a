"""Tiny models and adapters made by the tests themselves (nothing is downloaded).

make_tiny_llama(dir, **overrides) -> Path
    A Llama-family checkpoint (config.json + model.safetensors) with a local byte-level BPE
    tokenizer and a simple chat template. ``arch="mistral"`` / ``"qwen2"`` picks another family;
    other keywords override config fields (hidden_size, num_hidden_layers, rope_scaling, ...).
make_peft_adapter(base_dir, out_dir, *, r, alpha, target_modules, use_rslora=False, seed, init_scale)
    A LoRA adapter in PEFT's own format (peft.get_peft_model + save_pretrained, safetensors) with
    random non-zero A and B, so it visibly changes the outputs. Extra keywords go to LoraConfig
    (rank_pattern, alpha_pattern, layers_to_transform, ...).

Import it from a test with importlib (tests/ is not a package), for example in a conftest:
    spec = importlib.util.spec_from_file_location("models", Path(__file__).parents[N] / "models.py")
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a tiny model for loraplane tests",
    "select name from users where id = 42;",
    "LoRA adapters share one base model and many small deltas",
    "<|user|> <|assistant|> <|system|>",
]


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT calls transformers' deprecated ``is_gradient_checkpointing``; not ours to fix, and warnings are errors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def make_tokenizer(out_dir: Path, *, vocab_size: int = 300) -> Any:
    """A byte-level BPE tokenizer trained on a few lines (deterministic), saved into out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_llama(out_dir: Path, *, arch: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny checkpoint (hidden 64, 2 layers, vocab ~300) and its tokenizer; returns out_dir."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir)
    fields: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    if arch == "mistral":
        fields["sliding_window"] = None
    fields.update(overrides)
    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    config = config_cls(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1.0; make them non-trivial so a wrong norm shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def make_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    r: int,
    alpha: float,
    target_modules: list[str] | None = None,
    use_rslora: bool = False,
    seed: int = 0,
    init_scale: float = 0.1,
    **lora_kwargs: Any,
) -> Path:
    """Write a PEFT LoRA adapter for base_dir with random non-zero A and B; returns out_dir."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules or ALL_PROJECTIONS,
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        **lora_kwargs,
    )
    with quiet_peft():
        model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * init_scale)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)
