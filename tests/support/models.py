"""Tiny models and adapters made by the tests themselves (nothing is downloaded).

The makers live in the package (``loraplane.tinymodels``) because ``loraplane demo`` uses them too;
this module keeps the tests' import name. See that module for the functions:
make_tiny_llama(dir, *, arch="llama"|"mistral"|"qwen2", seed, **config overrides),
make_peft_adapter(base, out, *, r, alpha, target_modules, use_rslora, seed, init_scale, **LoraConfig),
train_adapter(base, out, *, prompt, completion, ...), quiet_peft().
Here too: peft_reference(base, adapters), the PEFT model the engine's outputs are compared with.
"""

from pathlib import Path
from typing import Any

from loraplane.tinymodels import (  # noqa: F401 - re-exported for the tests
    ALL_PROJECTIONS,
    CHAT_TEMPLATE,
    make_peft_adapter,
    make_tiny_llama,
    make_tokenizer,
    quiet_peft,
    train_adapter,
)


def peft_reference(base_dir: Path, adapters: dict[str, Path]) -> Any:
    """The reference: the base model (float32, eval mode) with every adapter loaded under its name."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    names = list(adapters)
    with quiet_peft():
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    return model
