"""The hostile-but-valid inputs that reached vLLM as 500s (issue 18), on the built-in engine: each gets a
400 naming its field (the engine lacks most of these features and refuses them by name), and the
server logs no traceback. tests/vllm_engine/test_robustness.py sends the same inputs to vLLM."""

from __future__ import annotations

import logging

import httpx
import pytest
from support.api import BASE, MakeServer

ENUM = {"type": "string", "enum": [f"value-{i}" for i in range(40_000)]}


def _schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


CASES = [
    ("logit-bias-negative", {"logit_bias": {"-1": 5}}, "logit_bias"),
    ("logit-bias-beyond-vocab", {"logit_bias": {"100000": 5}}, "logit_bias"),
    ("logit-bias-23-digits", {"logit_bias": {"12345678901234567890123": 5}}, "logit_bias"),
    ("logit-bias-not-a-number", {"logit_bias": {"seven": 5}}, "logit_bias"),
    ("response-format-nonsense", {"response_format": {"type": "nonsense"}}, "response_format"),
    ("schema-bounds-1e30", {"response_format": _schema({"type": "integer", "minimum": -1e30, "maximum": 1e30})},
     "response_format"),
    ("schema-40000-enum", {"response_format": _schema(ENUM)}, "response_format"),
    ("logprob-flood", {"n": 16, "logprobs": 20, "max_tokens": 900}, "n"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_gets_400_naming_its_field(
    make_server: MakeServer, caplog: pytest.LogCaptureFixture, extra: dict, field: str
) -> None:
    s = make_server()
    body = {"model": BASE, "prompt": "hello", "max_tokens": 4, "temperature": 0} | extra
    with caplog.at_level(logging.ERROR):
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text[:500]
    error = r.json()["error"]
    assert field in (error.get("param") or "") + error["message"], error
    assert not [rec for rec in caplog.records if rec.exc_info], "no traceback for a client's error"
