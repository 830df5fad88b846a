"""Sampling and stop handling on their own: filtering, seeds independent of the batch, stop strings
across token boundaries, and the text held back while a stop string could still complete."""

from __future__ import annotations

import pytest
import torch

from loraplane.crds.errors import PermanentError
from loraplane.worker.engine.sampling import SamplingParams, TextTail, sample


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
    alone_gen = seeded.generator(torch.device("cpu"))
    mixed_gen = seeded.generator(torch.device("cpu"))
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
