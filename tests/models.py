"""Tiny models and adapters made by the tests themselves (nothing is downloaded).

The makers live in the package (``loraplane.tinymodels``) because ``loraplane demo`` uses them too;
this module keeps the tests' import name. See that module for the functions:
make_tiny_llama(dir, *, arch="llama"|"mistral"|"qwen2", seed, **config overrides),
make_peft_adapter(base, out, *, r, alpha, target_modules, use_rslora, seed, init_scale, **LoraConfig),
train_adapter(base, out, *, prompt, completion, ...), quiet_peft().
"""

from loraplane.tinymodels import (  # noqa: F401 - re-exported for the tests
    ALL_PROJECTIONS,
    CHAT_TEMPLATE,
    make_peft_adapter,
    make_tiny_llama,
    make_tokenizer,
    quiet_peft,
    train_adapter,
)
