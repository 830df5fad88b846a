"""A new adapter version (new ID) swaps in while a request streams on the old one.

The streaming request keeps the ID it resolved at admission and finishes on the old weights; new
requests for the same name get the new ID; no request fails; the old ID's copies leave the CPU
tier and its device slot once its last request is done.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import openai
from support.api import MakeServer, reference_greedy, reference_text


def test_version_swap_while_streaming(
    make_server: MakeServer, adapters: dict[str, Path], peft_model: Any
) -> None:
    s = make_server(max_loras=2)
    old = s.add(21, "sql", adapters["a0"])
    tok = s.engine.tokenizer
    eos = set(s.engine.runner.config.eos_token_id)
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
    prompt = [1, 5, 9, 33]
    stream = c.completions.create(
        model="sql",
        prompt=prompt,
        max_tokens=200,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    tiers = s.engine.tiers
    in_flight = dict(tiers.refs)
    assert in_flight == {old.id: 1}  # 200 tokens take far longer than the swap below

    # The control path: the new version becomes Ready, then the old ID is removed.
    new = s.add(22, "sql", adapters["a3"])
    s.registry.remove(old.id)
    assert s.registry.lookup("sql") == new

    errors: list[BaseException] = []
    texts: list[str] = []

    def newcomer() -> None:
        try:
            got = c.completions.create(model="sql", prompt=prompt, max_tokens=8, temperature=0)
            texts.append(got.choices[0].text)
        except BaseException as exc:  # collected: no request may fail
            errors.append(exc)

    threads = [threading.Thread(target=newcomer) for _ in range(3)]
    for t in threads:
        t.start()
    rest = [ch.choices[0].text for ch in chunks if ch.choices]
    for t in threads:
        t.join(60)
    assert not errors
    streamed = first.choices[0].text + "".join(rest)
    want_old = reference_greedy(peft_model, "a0", prompt, 200, eos, ignore_eos=True)
    want_new = reference_greedy(peft_model, "a3", prompt, 8, eos)
    assert streamed == reference_text(tok, want_old, eos)
    assert texts == [reference_text(tok, want_new, eos)] * 3
    assert reference_text(tok, want_new, eos) != reference_text(tok, want_old[:8], eos)
    for _ in range(200):  # the stream ended; the engine releases the old ID right after its last token
        if old.id not in tiers.cpu and old.id not in tiers.slot_of:
            break
        threading.Event().wait(0.05)
    assert old.id not in tiers.cpu and old.id not in tiers.slot_of
    cards = {m["id"]: m["loraplane"]["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]}
    assert cards["sql"] == new.id
