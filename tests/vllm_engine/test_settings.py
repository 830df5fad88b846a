"""``--engine vllm`` settings are checked when the worker starts, with vLLM's own argument parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplane.worker import settings


def load(tmp_path: Path, *extra: str) -> settings.WorkerSettings:
    (tmp_path / "config.json").write_text("{}")
    return settings.load(["--base-model", str(tmp_path), "--engine", "vllm", *extra], environ={})


def test_pass_through_arguments_are_parsed_by_vllm(tmp_path: Path) -> None:
    s = load(tmp_path, "--vllm-args=--enforce-eager --max-num-seqs=64")
    assert (s.engine.kind, s.engine.vllm_args) == ("vllm", "--enforce-eager --max-num-seqs=64")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ("--no-such-flag", "--no-such-flag"),
        ("--max-num-seqs=many", "max-num-seqs"),
        ("--max-loras=4", "max_loras (set --max-loras)"),
        ("--dtype=float16", "dtype (set --dtype)"),
        ("--enforce-eager '--x", "closing quotation"),
    ],
)
def test_bad_pass_through_arguments_stop_the_start(tmp_path: Path, args: str, fragment: str) -> None:
    with pytest.raises(settings.ConfigError) as err:
        load(tmp_path, f"--vllm-args={args}")
    assert fragment in str(err.value) and "--vllm-args" in str(err.value)


def test_tool_call_parser_is_one_of_vllms(tmp_path: Path) -> None:
    assert load(tmp_path, "--tool-call-parser", "hermes").engine.tool_call_parser == "hermes"
    with pytest.raises(settings.ConfigError) as err:
        load(tmp_path, "--tool-call-parser", "no-such-parser")
    assert "no-such-parser" in str(err.value) and "hermes" in str(err.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(settings.ConfigError) as err:
        settings.load(["--base-model", str(tmp_path), "--tool-call-parser", "hermes"], environ={})
    assert "--engine vllm" in str(err.value)
