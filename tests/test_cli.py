"""The command-line surface: --version everywhere, `loraplane crds` output modes, size flags that take
Kubernetes quantities, and `loraplane validate` for CLI users and pipelines. Each runs the real
console script in a subprocess, as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraplane.crds import render
from loraplane.version import __version__

BIN = Path(sys.executable).parent


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "command",
    [
        ["loraplane"],
        ["loraplane", "crds"],
        ["loraplane", "validate"],
        ["loraplane", "demo"],
        ["loraplane", "dev-apiserver"],
        ["loraplane-operator"],
        ["loraplane-worker"],
    ],
    ids=" ".join,
)
def test_every_command_has_version(command: list[str]) -> None:
    out = run(str(BIN / command[0]), *command[1:], "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(__version__), out.stdout


def test_crds_to_stdout_apply_as_one_stream() -> None:
    out = run(str(BIN / "loraplane"), "crds")
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert [d["metadata"]["name"] for d in docs] == ["loraadapters.loraplane.io", "loraworkers.loraplane.io"]
    assert docs == [yaml.safe_load(t) for t in render.rendered().values()]


def test_crds_output_dir_writes_only_there(tmp_path: Path) -> None:
    out = run(
        str(BIN / "loraplane"),
        "crds",
        "--output-dir",
        str(tmp_path / "a"),
        "--output-dir",
        str(tmp_path / "b"),
    )
    assert out.returncode == 0, out.stderr
    for folder in ("a", "b"):
        written = {p.name: p.read_text() for p in (tmp_path / folder).iterdir()}
        assert written == render.rendered()
    both = run(str(BIN / "loraplane"), "crds", "--checkout", "--output-dir", str(tmp_path))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("1.5Gi", 1610612736),
        ("40e9", 40_000_000_000),
        ("20Gi", 20 << 30),
        ("500M", 500_000_000),
        ("123", 123),
    ],
)
def test_sizes_take_kubernetes_quantities(tmp_path: Path, given: str, want: int) -> None:
    from support import adapters

    from loraplane.worker import settings

    base = adapters.write_base_config(tmp_path / "base")
    s = settings.load(["--base-model", str(base), "--cache-bytes", given], environ={})
    assert s.cache.cache_bytes == want
    from_env = settings.load(["--base-model", str(base)], environ={"LORAPLANE_CACHE_BYTES": given})
    assert from_env.cache.cache_bytes == want


@pytest.mark.parametrize("given", ["1.5", "100m", "lots", "1.0001Ki"])
def test_sizes_that_are_not_whole_bytes_are_refused(tmp_path: Path, given: str) -> None:
    from support import adapters

    from loraplane.worker import settings

    base = adapters.write_base_config(tmp_path / "base")
    with pytest.raises(settings.ConfigError, match="--cache-bytes must be a whole number"):
        settings.load(["--base-model", str(base), "--cache-bytes", given], environ={})


def test_readme_by_hand_steps_create_the_ledger_namespace() -> None:
    """The operator stops without its ledger namespace; the README's manual install creates it."""
    from loraplane.operator.settings import OperatorSettings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    steps = readme.split("Or by hand", 1)[1].split("```", 2)[1]
    assert "loraplane crds | kubectl apply -f -" in steps
    assert f"kubectl create namespace {OperatorSettings().ledger_namespace}" in steps
    assert steps.index("create namespace") < steps.index("loraplane-operator")


# --- loraplane validate ------------------------------------------------------------------------------
def validate(*args: str) -> subprocess.CompletedProcess[str]:
    return run(str(BIN / "loraplane"), "validate", *args)


@pytest.fixture
def base_and_adapters(tmp_path: Path) -> tuple[Path, Path, Path]:
    from support import adapters

    base = adapters.write_base_config(tmp_path / "base")
    good = adapters.write_adapter(tmp_path / "roots" / "team-a" / "good")
    bad = adapters.write_adapter(tmp_path / "elsewhere" / "bad", r=32, config={"use_dora": True})
    return base, good, bad


def test_validate_json_for_pipelines(base_and_adapters: tuple[Path, Path, Path]) -> None:
    base, good, bad = base_and_adapters
    ok = validate(str(good), "--base-model", str(base), "--max-lora-rank", "8", "--output", "json")
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)  # stdout is exactly one JSON object
    assert (result["valid"], result["exitCode"], result["problems"]) == (True, 0, [])
    assert result["summary"]["rank"] == 8 and len(result["summary"]["sha256"]) == 64
    refused = validate(str(bad), "--base-model", str(base), "--max-lora-rank", "16", "--output", "json")
    assert refused.returncode == 1
    result = json.loads(refused.stdout)
    assert (result["valid"], result["exitCode"], result["summary"]) == (False, 1, None)
    assert {"RankTooLarge", "DoRANotSupported"} <= {p["reason"] for p in result["problems"]}
    missing = validate(str(good), "--base-model", "/nonexistent", "--output", "json")
    assert missing.returncode == 2 and json.loads(missing.stdout)["exitCode"] == 2


def test_validate_local_roots_as_a_worker_has_them(base_and_adapters: tuple[Path, Path, Path]) -> None:
    base, good, bad = base_and_adapters
    roots = str(good.parents[1])
    inside = validate(f"file://{good}", "--base-model", str(base), "--local-roots", roots)
    assert inside.returncode == 0, inside.stderr
    outside = validate(str(bad), "--base-model", str(base), "--local-roots", roots)
    assert outside.returncode == 1
    assert (
        "PathNotAllowed" in outside.stderr and f"outside the allowed local roots ({roots})" in outside.stderr
    )


def test_validate_speaks_to_a_cli_user(base_and_adapters: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, good, _ = base_and_adapters
    gone = validate(f"file://{tmp_path / 'gone'}", "--base-model", str(base))
    assert gone.returncode == 2 and f"{tmp_path / 'gone'}: no such directory" in gone.stderr, gone.stderr
    assert "this worker" not in gone.stdout + gone.stderr
    relative = run(str(BIN / "loraplane"), "validate", good.name, "--base-model", str(base), timeout=120)
    assert relative.returncode != 0  # a bare name is a Hub id (org/name required), not a file next to you
    assert "Traceback" not in relative.stderr


# --- loraplane validate: provenance (docs/provenance.md) -----------------------------------------------
def test_validate_digest_and_expect_digest(base_and_adapters: tuple[Path, Path, Path]) -> None:
    from loraplane.worker import provenance

    base, good, bad = base_and_adapters
    alone = validate("--digest", str(good))
    want = provenance.digest_of(provenance.file_digests(good))
    assert (alone.returncode, alone.stdout) == (0, want + "\n"), alone.stderr  # the digest alone, for scripts
    full = validate(
        str(good), "--base-model", str(base), "--max-lora-rank", "8", "--digest", "--output", "json"
    )
    assert full.returncode == 0 and json.loads(full.stdout)["digest"] == want, full.stderr
    pinned = validate(str(good), "--expect-digest", want, "--output", "json")
    assert pinned.returncode == 0 and json.loads(pinned.stdout)["valid"], pinned.stderr
    other = validate(str(bad), "--expect-digest", want, "--output", "json")
    result = json.loads(other.stdout)
    assert (other.returncode, result["exitCode"], result["valid"]) == (1, 1, False)
    (problem,) = result["problems"]
    assert (
        problem["reason"] == "DigestMismatch"
        and want in problem["message"]
        and result["digest"] in problem["message"]
    )
    malformed = validate(str(good), "--expect-digest", "sha1:abc")
    assert malformed.returncode == 2 and "--expect-digest must match" in malformed.stderr
    neither = validate(str(good))
    assert neither.returncode == 2 and "--base-model is required unless" in neither.stderr


def test_validate_verify_exit_codes_and_json(tmp_path: Path) -> None:
    from support import adapters, signing

    key, public = signing.key_pair(tmp_path / "keys", "team")
    _, other = signing.key_pair(tmp_path / "keys", "other")
    chain = signing.certificate_chain(tmp_path / "pki", "team")
    by_key = adapters.write_adapter(tmp_path / "by-key")
    signing.sign_with_key(by_key, key)
    by_cert = adapters.write_adapter(tmp_path / "by-cert")
    signing.sign_with_certificate(by_cert, chain)
    unsigned = adapters.write_adapter(tmp_path / "unsigned")

    def verify(d: Path, *trust: str) -> tuple[int, dict]:  # type: ignore[type-arg]
        out = validate(str(d), "--verify", *trust, "--output", "json")
        return out.returncode, json.loads(out.stdout)

    code, result = verify(by_key, "--public-key", str(other), "--public-key", str(public))
    assert (code, result["valid"], result["signer"]) == (0, True, "key team.pub"), result
    code, result = verify(by_cert, "--certificate-chain", str(chain.root))
    assert (code, result["signer"]) == (0, "certificate CN=team release signer,O=team"), result
    for d, trust, reason in [
        (unsigned, ("--public-key", str(public)), "SignatureMissing"),
        (by_key, ("--public-key", str(other)), "UntrustedSigner"),
        (by_key, (), "UntrustedSigner"),  # no trust material given
    ]:
        code, result = verify(d, *trust)
        assert (code, result["valid"], [p["reason"] for p in result["problems"]]) == (1, False, [reason]), (
            result
        )
    weights = by_key / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    code, result = verify(by_key, "--public-key", str(public))
    assert code == 1 and result["problems"][0]["reason"] == "SignatureInvalid", result
    assert "adapter_model.safetensors differs from the signed file" in result["problems"][0]["message"]
    text = validate(str(by_cert), "--verify", "--certificate-chain", str(chain.root))
    assert text.returncode == 0 and "signature OK: model.sig signed by certificate" in text.stdout, (
        text.stderr
    )
