"""A new version of an adapter while clients keep streaming it: the scenario both engines are held to.

``swap_under_streaming`` streams completions of one adapter from two threads, points its LoRAAdapter
at other weights (a path change: a new version, a new ID), waits until the worker serves the new ID and
one stream has started after that, and returns what every stream got. ``Swap.check`` asserts what both
engines promise: no request fails, every answer is one whole version, requests in flight at the change
finish on the old weights, requests after it get the new ones. tests/e2e/test_serving.py (the built-in
engine) and tests/vllm_engine/test_worker.py (vLLM) add their own checks on top.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import fleet


@dataclass
class Swap:
    old_id: int
    new_id: int = 0
    patched_at: float = 0.0
    served_at: float = 0.0  # when /v1/models first listed the new ID
    runs: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, text)
    errors: list[BaseException] = field(default_factory=list)
    samples: list[Any] = field(default_factory=list)  # what ``sample`` returned, every 50 ms

    def check(self, old_text: str, new_text: str) -> None:
        assert not self.errors, self.errors
        odd = [text for _, _, text in self.runs if text not in (old_text, new_text)]
        assert not odd, (
            f"every answer is one whole version; got {odd[0]!r}, want {old_text!r} or {new_text!r}"
        )
        in_flight = [text for start, end, text in self.runs if start < self.patched_at < end]
        assert in_flight and all(text == old_text for text in in_flight), (
            "in-flight requests finish on the old"
        )
        assert all(text == new_text for start, _, text in self.runs if start > self.served_at), (
            "new requests get the new"
        )


def swap_under_streaming(
    client: Any,
    kube: Any,
    ads: fleet.Adapters,
    *,
    name: str,
    new_path: Path,
    prompt: list[int],
    max_tokens: int,
    wait_s: float,
    sample: Callable[[], Any] | None = None,
    diagnose: Callable[[], str] | None = None,
) -> Swap:
    """Stream ``name`` from two threads, change its path to ``new_path``, and return what happened.
    ``wait_s`` bounds each wait (and each thread's loop, five times over); ``sample`` is called every
    50 ms throughout; ``diagnose`` says what to print when the new ID does not come."""
    swap = Swap(old_id=ads.ids()[name])
    done = threading.Event()
    namespace = ads.namespace

    def keep_streaming() -> None:
        deadline = time.monotonic() + 5 * wait_s
        while not done.is_set() and time.monotonic() < deadline:
            start = time.monotonic()
            try:
                stream = client.completions.create(
                    model=name,
                    prompt=prompt,
                    max_tokens=max_tokens,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},  # as PEFT's reference, which runs to max_tokens
                )
                text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
                swap.runs.append((start, time.monotonic(), text))
            except BaseException as exc:  # collected and asserted by check()
                swap.errors.append(exc)
                return

    def keep_sampling() -> None:
        assert sample is not None
        deadline = time.monotonic() + 5 * wait_s
        while not done.is_set() and time.monotonic() < deadline:
            swap.samples.append(sample())
            time.sleep(0.05)

    threads = [threading.Thread(target=keep_streaming) for _ in range(2)]
    if sample is not None:
        threads.append(threading.Thread(target=keep_sampling))
    for t in threads:
        t.start()
    try:
        fleet.wait_for(lambda: len(swap.runs) >= 2 or swap.errors, wait_s, "two streams before the change")
        swap.patched_at = time.monotonic()
        kube.kubectl(
            "patch", "lora", name, "-n", namespace, "--type", "merge",
            "-p", json.dumps({"spec": {"path": f"file://{new_path}"}}),
        )  # fmt: skip

        def new_id() -> int | None:
            got = (ads.get(name).get("status") or {}).get("id")
            return got if got not in (None, swap.old_id) else None

        swap.new_id = fleet.wait_for(new_id, wait_s, diagnose or f"a new ID for {name}")

        def served_id() -> int | None:
            listed = {m.id: (m.model_extra or {}).get("loraplane") or {} for m in client.models.list().data}
            return listed.get(name, {}).get("id")

        fleet.wait_for(lambda: served_id() == swap.new_id, wait_s, f"{name} served with its new ID")
        swap.served_at = time.monotonic()
        fleet.wait_for(
            lambda: any(start > swap.served_at for start, _, _ in swap.runs) or swap.errors,
            wait_s,
            "a stream after the change",
        )
    finally:
        done.set()
        for t in threads:
            t.join(120)
    return swap
