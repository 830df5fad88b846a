"""An adapter's own chat template: read from its directory, checked, and used for its chat requests.

An adapter fine-tuned on a chat format other than the base model's ships that format, as a
``chat_template.jinja`` or as ``chat_template`` in its ``tokenizer_config.json`` (what
``tokenizer.save_pretrained`` writes; the ``.jinja`` file wins, as in transformers). Chat requests for
that adapter render with it; every other adapter, and the base model, use the base model's template.
Validation reads it once (size-capped, Jinja syntax checked in the sandbox transformers renders in),
so a broken template fails that adapter alone, with a reason, before it serves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
FILES = (TEMPLATE_FILE, TOKENIZER_CONFIG)
"""Fetched with the adapter when present (never required)."""
MAX_BYTES = 1 << 20
"""Largest template file or tokenizer_config.json read (1 MiB; real templates are a few KiB)."""
INVALID = "InvalidChatTemplate"
BASE = "base model"


@dataclass(frozen=True)
class ChatTemplate:
    text: str | None
    """The adapter's template; None: the base model's is used."""
    source: str
    """Where it came from: "chat_template.jinja", "tokenizer_config.json", or "base model"."""


def read(adapter_dir: Path) -> tuple[ChatTemplate, list[tuple[str, str]]]:
    """The adapter's chat template, and the problems found ([(reason, message)]; empty when fine)."""
    adapter_dir = Path(adapter_dir)
    for name in FILES:
        path = adapter_dir / name
        if not path.is_file():
            continue
        size = path.stat().st_size
        if size > MAX_BYTES:
            return ChatTemplate(None, BASE), [
                (INVALID, f"{name} is {size} bytes, above the limit of {MAX_BYTES}")
            ]
        raw = path.read_text(encoding="utf-8", errors="replace")
        if name == TEMPLATE_FILE:
            text: Any = raw
        else:
            try:
                text = json.loads(raw).get("chat_template")
            except (ValueError, AttributeError) as e:
                return ChatTemplate(None, BASE), [(INVALID, f"{name} is not a JSON object: {e}")]
            if text is None:
                continue  # a tokenizer config without a template: the base model's
            if isinstance(text, list):  # named templates (transformers): the "default" one serves chat
                text = next(
                    (t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"),
                    None,
                )
        if not isinstance(text, str) or not text.strip():
            return ChatTemplate(None, BASE), [(INVALID, f"{name}: chat_template is not a template string")]
        problem = _syntax(text)
        if problem:
            return ChatTemplate(None, BASE), [(INVALID, f"{name}: {problem}; fix the template or remove it")]
        return ChatTemplate(text, name), []
    return ChatTemplate(None, BASE), []


def _syntax(text: str) -> str | None:
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except TemplateSyntaxError as e:
        return f"Jinja syntax error at line {e.lineno}: {e.message}"
    return None
