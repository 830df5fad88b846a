"""The pydantic models refuse what admission refuses, with the same words.

The CEL rules in the CRD and the Python check are built from one table (crds/paths.py); this test
evaluates the generated CEL with a CEL interpreter over the same inputs, so the two cannot drift.
"""

from __future__ import annotations

import celpy
import pytest

from loraplane.crds import paths
from loraplane.crds.models import LoRAAdapterStatus, parse_adapter
from loraplane.errors import PermanentError

GOOD = ["org/name", "hf://org/name", "/models/a", "file:///models/a", "s3://bucket/a/b", "s3://my.bucket-1"]
GOOD += ["gs://bucket/a/b", "gs://my_bucket.v-1"]
BAD = {
    "relative/dir/x": paths.PATH_RULES[0].message,
    "adapter": paths.PATH_RULES[0].message,
    "../x": paths.PATH_RULES[1].message,
    "/models/../etc": paths.PATH_RULES[1].message,
    "ftp://host/x": paths.PATH_RULES[0].message,
    "gcs://bucket/x": paths.PATH_RULES[0].message,
    "gs://Upper/x": paths.PATH_RULES[0].message,
    "gs://ab": paths.PATH_RULES[0].message,
    "s3://Upper/x": paths.PATH_RULES[0].message,
    "hf://org/name/extra": paths.PATH_RULES[0].message,
}


def _cel_accepts(rule: str, value: str) -> bool:
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    return bool(program.evaluate({"self": celpy.celtypes.StringType(value)}))


@pytest.mark.parametrize("path", GOOD)
def test_accepted_paths(path: str) -> None:
    assert paths.path_problems(path) == []
    assert all(_cel_accepts(r.rule, path) for r in paths.PATH_RULES)


@pytest.mark.parametrize(("path", "message"), sorted(BAD.items()))
def test_refused_paths_same_in_cel_and_python(path: str, message: str) -> None:
    assert message in paths.path_problems(path)
    failing = [r.message for r in paths.PATH_RULES if not _cel_accepts(r.rule, path)]
    assert failing == paths.path_problems(path)


def _adapter(**spec: object) -> dict:
    return {"metadata": {"name": "a", "namespace": "ns"}, "spec": {"baseModel": "m", "path": "org/x", **spec}}


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"path": "../x"}, "spec.path: path must be a Hugging Face repo id"),
        ({"path": ""}, "spec.path: String should have at least 1 character"),
        ({"baseModel": None}, "spec.baseModel: Input should be a valid string"),
        ({"name": "x" * 129}, "spec.name: String should have at most 128 characters"),
        ({"revision": "has space"}, "spec.revision: String should match pattern"),
        (
            {"longContext": {"maxLength": 0}},
            "spec.longContext.maxLength: Input should be greater than or equal to 1",
        ),
        (
            {"longContext": {"maxLength": "long"}},
            "spec.longContext.maxLength: Input should be a valid integer",
        ),
    ],
)
def test_bad_specs_name_the_field(spec: dict, fragment: str) -> None:
    with pytest.raises(PermanentError) as err:
        parse_adapter(_adapter(**spec))
    assert err.value.reason == "InvalidSpec"
    assert fragment in err.value.message


def test_served_name_defaults_to_metadata_name() -> None:
    assert parse_adapter(_adapter()).served_name == "a"
    assert parse_adapter(_adapter(name="sql")).served_name == "sql"


@pytest.mark.parametrize("bad_id", [0, -1, 2**31])
def test_ids_are_positive_int32(bad_id: int) -> None:
    with pytest.raises(ValueError):
        LoRAAdapterStatus(id=bad_id)
