"""ID sets as range strings: what the LoRAWorker report carries (crds/ranges.py)."""

from __future__ import annotations

import pytest

from loraplane.crds import ranges


@pytest.mark.parametrize(
    ("ids", "text"),
    [([], ""), ([7], "7"), ([3, 1, 2], "1-3"), ([1, 2, 3, 7, 9, 10], "1-3,7,9-10"), ([5, 5, 6], "5-6")],
)
def test_encode_decode_round_trip(ids, text):
    assert ranges.encode(ids) == text
    assert ranges.decode(text) == sorted(set(ids))


@pytest.mark.parametrize("bad", ["5-3", "a", "1--2", "-4"])
def test_decode_refuses_what_is_not_a_range(bad):
    with pytest.raises(ValueError):
        ranges.decode(bad)


def test_blocks_are_keyed_by_their_first_id():
    assert [ranges.block_of(i) for i in (1, 999, 1000, 12345)] == ["0", "0", "1000", "12000"]
    assert ranges.from_blocks({"0": "1-3", "1000": "1000,1002"}) == [1, 2, 3, 1000, 1002]
