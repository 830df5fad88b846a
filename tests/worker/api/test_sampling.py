"""Sampling and stop handling: filtering, seeds independent of the batch (also through a served engine
beside other tenants), stop strings across token boundaries, and the text held back while a stop
string could still complete."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
import torch
from support.api import BASE, MakeServer

from loraplane.errors import PermanentError
from loraplane.worker.builtin.sampling import TextTail, generator_for, sample
from loraplane.worker.inference.sampling import SamplingParams


class PieceTokenizer:
    """A stand-in tokenizer whose tokens are fixed text pieces (a real one splits text unpredictably)."""

    PIECES = {1: "he", 2: "ll", 3: "o ", 4: "wo", 5: "rld", 6: "!"}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.PIECES[i] for i in ids)


@pytest.mark.parametrize(
    ("stop", "tokens", "text", "stopped"),
    [
        (("o w",), [1, 2, 3, 4, 5], "hell", True),  # spans two tokens
        (("rld",), [1, 2, 3, 4, 5, 6], "hello wo", True),
        (("xyz", "ll"), [1, 2, 3], "he", True),  # the earliest of several
        (("zzz",), [1, 2, 3, 4], "hello wo", False),
        ((), [1, 2, 3], "hello ", False),
    ],
)
def test_stop_strings_cut_text_and_streamed_pieces_add_up(
    stop: tuple[str, ...], tokens: list[int], text: str, stopped: bool
) -> None:
    tail = TextTail(PieceTokenizer(), stop)
    pieces = []
    for t in tokens:
        pieces.append(tail.push(t))
        if tail.stopped:
            break
        # nothing handed out may later turn out to be part of a stop string
        assert all(s not in tail.text[: tail.emitted + len(s) - 1] for s in stop)
    pieces.append(tail.flush())
    assert ("".join(pieces), tail.stopped) == (text, stopped)


def test_top_k_and_top_p_restrict_the_draw() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(400, 1)
    k2 = sample(logits, [SamplingParams(temperature=1.0, top_k=2)] * 400, [None] * 400)
    assert set(k2) == {1, 2}
    p_small = sample(logits, [SamplingParams(temperature=1.0, top_p=0.01)] * 400, [None] * 400)
    assert set(p_small) == {1}
    p_mid = sample(logits, [SamplingParams(temperature=1.0, top_p=0.8)] * 400, [None] * 400)
    assert set(p_mid) == {1, 2}
    greedy = sample(logits[:3], [SamplingParams(temperature=0.0)] * 3, [None] * 3)
    assert greedy == [1, 1, 1]


def test_seeded_draws_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    vocab = 50
    steps = [torch.randn(3, vocab) for _ in range(20)]
    seeded = SamplingParams(temperature=1.0, seed=123)
    other = SamplingParams(temperature=0.7, top_p=0.9)
    alone_gen = generator_for(seeded, torch.device("cpu"))
    mixed_gen = generator_for(seeded, torch.device("cpu"))
    alone, mixed = [], []
    for logits in steps:
        alone += sample(logits[1:2], [seeded], [alone_gen])
        mixed.append(
            sample(logits, [other, seeded, SamplingParams(temperature=0)], [None, mixed_gen, None])[1]
        )
    assert alone == mixed


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(stop=("",)), "empty"),
        (dict(stop=tuple("abcdefghi")), "at most 8"),
        (dict(stop=("x" * 300,)), "256 characters"),
    ],
)
def test_bad_sampling_params_are_refused(fields: dict, fragment: str) -> None:
    with pytest.raises(PermanentError) as err:
        SamplingParams(**fields)
    assert err.value.reason == "InvalidSamplingParams" and fragment in err.value.message


def test_a_row_without_a_distribution_fails_alone_and_moves_no_other_generator() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 40)
    logits[2] = float("nan")  # what no temperature or filter can make a distribution of
    seeded = SamplingParams(temperature=1.0, seed=9)
    alone_gen, mixed_gen = (
        generator_for(seeded, torch.device("cpu")),
        generator_for(seeded, torch.device("cpu")),
    )
    alone = [sample(logits[1:2], [seeded], [alone_gen])[0] for _ in range(5)]
    mixed = [
        sample(
            logits,
            [SamplingParams(temperature=0.5), seeded, SamplingParams(temperature=1)],
            [None, mixed_gen, None],
        )  # fmt: skip
        for _ in range(5)
    ]
    assert [m[1] for m in mixed] == alone
    assert all(m[2] is None and m[0] is not None for m in mixed)


def test_seeded_outputs_ignore_other_tenants_in_the_batch(make_server: MakeServer) -> None:
    """Six seeded requests answer the same alone and beside ten tenants that keep sending temperatures
    that underflow float32 (5e-324, 1e-300: issue 18 saw 0/36 match, and 500s for those tenants);
    those get the greedy text (the T -> 0 limit)."""
    s = make_server(max_num_seqs=16)
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
    prompts = [f"tenant {i} says" for i in range(6)]
    done = threading.Event()

    def complete(prompt: str, max_tokens: int, **kw: Any) -> str:
        return c.completions.create(model=BASE, prompt=prompt, max_tokens=max_tokens, **kw).choices[0].text

    def seeded(prompt: str) -> str:
        return complete(prompt, 12, temperature=1, seed=42)

    def other(i: int) -> list[str | Exception]:  # half seeded too: their draw came after others' draws
        kw = {"temperature": (5e-324, 1e-300)[i % 2], "seed": (None, 7)[i // 5]}
        texts: list[str | Exception] = []
        while not done.is_set() and len(texts) < 50:
            try:
                texts.append(complete("other tenant", 2, **kw))
            except openai.APIError as exc:
                texts.append(exc)
        return texts

    solo = [seeded(p) for p in prompts]
    greedy = complete("other tenant", 2, temperature=0)
    with ThreadPoolExecutor(16) as pool:
        for _ in range(3):
            done.clear()
            mine = [pool.submit(seeded, p) for p in prompts]
            others = [pool.submit(other, i) for i in range(10)]
            together = [f.result() for f in mine]
            done.set()
            assert together == solo
            assert {str(t) for f in others for t in f.result()} == {greedy}
