"""Tiny Llama-family checkpoints and LoRA adapters made on the spot, for the demo and the tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a few lines, the base model has
random weights, and adapters are trained for a few seconds with PEFT to complete a prompt with a
phrase of their own, so that each adapter's output is visibly different from the base model's.
Needs the ``worker`` extra (torch, transformers) and, for ``train_adapter``, PEFT (the ``demo`` extra).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    """PEFT calls transformers' deprecated ``is_gradient_checkpointing``; not ours to fix."""
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
    """Write a tiny checkpoint (hidden 64, 2 layers, vocab ~300) and its tokenizer; returns out_dir.

    ``arch`` is "llama", "mistral", "qwen2" or "qwen3"; keywords override config fields.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

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
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    config_cls = classes[arch]
    config = config_cls(**fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1.0; make them non-trivial so a wrong norm shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def _peft_model(
    base_dir: Path, *, r: int, alpha: float, target_modules: list[str] | None, **lora: Any
) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules or ALL_PROJECTIONS,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        **lora,
    )
    with quiet_peft():
        return get_peft_model(base, config)


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
    import torch

    model = _peft_model(
        base_dir, r=r, alpha=alpha, target_modules=target_modules, use_rslora=use_rslora, **lora_kwargs
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * init_scale)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def train_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    prompt: str,
    completion: str,
    r: int = 8,
    alpha: float = 16,
    steps: int = 120,
    seed: int = 0,
) -> Path:
    """Train a LoRA adapter for a few seconds so that greedy decoding of ``prompt`` gives ``completion``."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = _peft_model(base_dir, r=r, alpha=alpha, target_modules=None)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + target_ids])
    labels = ids.clone()
    labels[0, : len(prompt_ids)] = -100  # learn the completion only
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)
