"""Provenance: the adapter digest (the OpenSSF manifest's root digest) and model signatures, checked as the
worker checks them: the files' sha256s come from the cache, which hashed them as they arrived.

Signatures are made by model-signing itself, with a key pair and with a certificate chain made here.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from support import adapters, servers, signing

from loraplane.errors import LoraplaneError
from loraplane.worker import cache as c
from loraplane.worker import provenance as p
from loraplane.worker import sources as s
from loraplane.worker.prefetch import Prefetcher
from loraplane.worker.sources.gcs import GcsSettings

moto_s3 = servers.moto_s3
hf_hub = servers.hf_hub
gcs = servers.gcs


def _signed_subject(sig: Path) -> str:
    """The root digest a model-signing statement names as its subject."""
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    return "sha256:" + statement["subject"][0]["digest"]["sha256"]


def test_the_digest_is_the_model_signing_subject(tmp_path: Path) -> None:
    """spec.digest and a signature over the adapter files name the same digest: one canonical form."""
    d = adapters.write_adapter(tmp_path / "a")
    key, _ = signing.key_pair(tmp_path / "keys", "team")
    sig = signing.sign_with_key(d, key)
    digest = p.digest_of(p.file_digests(d))
    assert digest == _signed_subject(sig)
    assert digest.startswith("sha256:") and len(digest) == 71


def test_what_changes_the_digest(tmp_path: Path) -> None:
    d = adapters.write_adapter(tmp_path / "a", seed=1)
    files = p.file_digests(d)
    digest = p.digest_of(files)
    assert p.digest_of(dict(reversed(files.items()))) == digest  # order of listing does not matter
    # Weights changed, config changed (alpha alone changes the outputs), a file added to the manifest.
    weights = p.file_digests(adapters.write_adapter(tmp_path / "b", seed=2))
    assert p.digest_of({**files, "adapter_model.safetensors": weights["adapter_model.safetensors"]}) != digest
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": cfg["lora_alpha"] + 1}))
    assert p.digest_of(p.file_digests(d)) != digest
    assert p.digest_of({**files, "tokenizer.json": files["adapter_config.json"]}) != digest
    # A file loraplane never fetches is outside the manifest: it cannot change what is served.
    (tmp_path / "a2").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "a2" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    (tmp_path / "a2" / "README.md").write_text("# notes")
    assert p.digest_of(p.file_digests(tmp_path / "a2")) == p.digest_of(p.file_digests(d))
    # The adapter's own chat template decides its prompts: it is in the manifest.
    (tmp_path / "a2" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert "chat_template.jinja" in p.file_digests(tmp_path / "a2")
    assert p.digest_of(p.file_digests(tmp_path / "a2")) != p.digest_of(p.file_digests(d))


def _every_source(kind: str, tmp_path: Path, d: Path, request: pytest.FixtureRequest) -> tuple[str, Any]:
    if kind == "local":
        return f"file://{d}", s.SourceSettings(local_roots=(tmp_path,))
    if kind == "s3":
        moto = request.getfixturevalue("moto_s3")
        bucket = moto.bucket()
        moto.put_dir(bucket, "team-a/sql", d)
        moto.client.put_object(Bucket=bucket, Key="team-a/sql/README.md", Body=b"not fetched")
        return f"s3://{bucket}/team-a/sql", s.SourceSettings(s3_endpoint_url=moto.endpoint_url, timeout_s=5)
    if kind == "gs":
        gcs = request.getfixturevalue("gcs")
        bucket = gcs.bucket()
        gcs.put_dir(bucket, "team-a/sql", d)
        gcs.client.bucket(bucket).blob("team-a/sql/README.md").upload_from_string(b"not fetched")
        options = {"gs": GcsSettings(endpoint=gcs.endpoint_url, credentials="anonymous")}
        return f"gs://{bucket}/team-a/sql", s.SourceSettings(options=options, timeout_s=5)
    hub = request.getfixturevalue("hf_hub")
    hub.add_commit("team-a/sql", {**{f.name: f for f in d.iterdir()}, "README.md": b"# sql"})
    return "hf://team-a/sql", s.SourceSettings(hf_endpoint=hub.url, timeout_s=5, state_dir=tmp_path / "state")


@pytest.mark.parametrize("kind", ["local", "s3", "gs", "hf"])
def test_every_source_gives_the_same_digest_and_its_signature(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache's digest (from the sha256s computed while the bytes streamed in) is the one the CLI prints
    for the directory; model.sig comes along and verifies against the fetched files."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    d = adapters.write_adapter(tmp_path / "a")
    key, public = signing.key_pair(tmp_path / "keys", "team")
    signing.sign_with_key(d, key)
    path, settings = _every_source(kind, tmp_path, d, request)
    resolved = s.resolve(path, None, settings)
    assert [f.name for f in resolved.files] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "model.sig",
    ]
    entry = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings).prefetch(
        resolved
    )
    assert entry.digest == p.digest_of(p.file_digests(d)) == _signed_subject(d / "model.sig")
    assert sorted(x.name for x in entry.path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
        "model.sig",
    ]
    assert (
        p.verify(entry.path / "model.sig", entry.file_digests, p.Trust(public_keys=(public,)))
        == "key team.pub"
    )


def test_a_signature_added_later_is_a_new_cache_entry(tmp_path: Path) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    settings = s.SourceSettings(local_roots=(tmp_path,))
    before = s.resolve(str(d), None, settings)
    signing.sign_with_key(d, signing.key_pair(tmp_path / "keys", "team")[0])
    after = s.resolve(str(d), None, settings)
    assert after.cache_key != before.cache_key


# --- signatures: key pairs and a certificate chain -------------------------------------------------
@pytest.fixture
def signed(tmp_path: Path) -> dict[str, Any]:
    """An adapter signed by 'team' with a key, one signed through team's CA, and the trust for each."""
    key, public = signing.key_pair(tmp_path / "keys", "team")
    _, other_public = signing.key_pair(tmp_path / "keys", "other")
    chain = signing.certificate_chain(tmp_path / "pki", "team")
    other_chain = signing.certificate_chain(tmp_path / "pki", "other")
    by_key = adapters.write_adapter(tmp_path / "by-key")
    (by_key / "README.md").write_text("# signed too, never fetched")  # signed files not served are fine
    signing.sign_with_key(by_key, key)
    by_cert = adapters.write_adapter(tmp_path / "by-cert")
    signing.sign_with_certificate(by_cert, chain)
    return {
        "by_key": by_key,
        "by_cert": by_cert,
        "key": p.Trust(public_keys=(other_public, public)),  # the second trusted key signed it
        "other_key": p.Trust(public_keys=(other_public,)),
        "chain": p.Trust(certificate_chain=(chain.root,)),
        "other_chain": p.Trust(certificate_chain=(other_chain.root,)),
    }


def _verify(d: Path, trust: p.Trust) -> str:
    return p.verify(d / "model.sig", p.file_digests(d), trust)


def _refused(d: Path, trust: p.Trust) -> LoraplaneError:
    with pytest.raises(LoraplaneError) as e:
        _verify(d, trust)
    assert not e.value.retry
    return e.value


def test_valid_signatures_name_their_signer(signed: dict[str, Any]) -> None:
    assert _verify(signed["by_key"], signed["key"]) == "key team.pub"
    assert _verify(signed["by_cert"], signed["chain"]) == "certificate CN=team release signer,O=team"


@pytest.mark.parametrize("how", ["by_key", "by_cert"])
def test_missing_tampered_and_wrong_signer(signed: dict[str, Any], how: str) -> None:
    d, trust = signed[how], signed["key" if how == "by_key" else "chain"]
    wrong = signed["other_key" if how == "by_key" else "other_chain"]
    e = _refused(d, wrong)
    assert e.reason == p.UNTRUSTED_SIGNER, e

    weights = d / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    e = _refused(d, trust)
    assert (
        e.reason == p.SIGNATURE_INVALID
        and "adapter_model.safetensors differs from the signed file" in e.message
    )
    weights.write_bytes(original)

    cfg = d / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"lora_alpha": ', '"lora_alpha": 1'))
    e = _refused(d, trust)
    assert e.reason == p.SIGNATURE_INVALID and "adapter_config.json differs" in e.message

    sig = (d / "model.sig").read_bytes()
    bundle = json.loads(sig)
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64  # re-point a file without re-signing
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    (d / "model.sig").write_text(json.dumps(bundle))
    e = _refused(d, trust)
    assert e.reason == p.SIGNATURE_INVALID and "altered" in e.message

    (d / "model.sig").write_text("not a bundle")
    assert _refused(d, trust).reason == p.SIGNATURE_INVALID
    (d / "model.sig").unlink()
    e = _refused(d, trust)
    assert e.reason == p.SIGNATURE_MISSING and "model_signing sign" in e.message


def test_a_file_not_covered_and_no_trust(signed: dict[str, Any], tmp_path: Path) -> None:
    d = adapters.write_adapter(tmp_path / "partial")
    key, public = signing.key_pair(tmp_path / "keys2", "team")
    signing.sign_with_key(d, key, ignore=("adapter_config.json",))
    e = _refused(d, p.Trust(public_keys=(public,)))
    assert e.reason == p.SIGNATURE_INVALID and "adapter_config.json is not covered" in e.message
    # A key-signed bundle where only certificates are trusted, and no trust at all.
    assert _refused(signed["by_key"], signed["chain"]).reason == p.UNTRUSTED_SIGNER
    e = _refused(signed["by_key"], p.Trust())
    assert e.reason == p.UNTRUSTED_SIGNER and "no trust material" in e.message


def test_digest_mismatch_names_both_values() -> None:
    with pytest.raises(LoraplaneError) as e:
        p.check_digest("sha256:" + "a" * 64, "sha256:" + "b" * 64, "adapter ns/x")
    assert e.value.reason == p.DIGEST_MISMATCH and not e.value.retry
    assert "a" * 64 in e.value.message and "b" * 64 in e.value.message


def test_a_hub_revision_and_a_digest_pin_both(
    tmp_path: Path, hf_hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The revision picks the commit, the digest its bytes: main moving on is refused for v1's pin."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    v1 = adapters.write_adapter(tmp_path / "v1", seed=1)
    hf_hub.add_commit("team-a/sql", v1, tags=("v1",))
    hf_hub.add_commit("team-a/sql", adapters.write_adapter(tmp_path / "v2", seed=2))
    pin = p.digest_of(p.file_digests(v1))
    settings = s.SourceSettings(hf_endpoint=hf_hub.url, timeout_s=5, state_dir=tmp_path / "state")
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings)
    p.check_digest(pin, cache.prefetch(s.resolve("hf://team-a/sql", "v1", settings)).digest, "v1")
    with pytest.raises(LoraplaneError) as e:
        p.check_digest(pin, cache.prefetch(s.resolve("hf://team-a/sql", None, settings)).digest, "main")
    assert e.value.reason == p.DIGEST_MISMATCH


def test_a_keyless_bundle_goes_to_sigstore_and_a_forged_one_never_passes(signed: dict[str, Any]) -> None:
    """Sigstore keyless needs Sigstore's trust root: offline that is TrustRootUnavailable (retried, nothing
    judged); online, this forged bundle (a key signature posing as keyless) is an UntrustedSigner."""
    d = signed["by_key"]
    bundle = json.loads((d / "model.sig").read_text())
    bundle["verificationMaterial"]["tlogEntries"] = [{"logIndex": "1"}]
    (d / "model.sig").write_text(json.dumps(bundle))
    trust = p.Trust(sigstore_identity="release@example.com", sigstore_issuer="https://issuer.example.com")
    with pytest.raises(LoraplaneError) as e:
        _verify(d, trust)
    assert (e.value.reason, e.value.retry) in {(p.TRUST_ROOT_UNAVAILABLE, True), (p.UNTRUSTED_SIGNER, False)}
    # Trusting only keys, a keyless bundle is refused by name.
    e2 = _refused(d, signed["key"])
    assert e2.reason == p.UNTRUSTED_SIGNER and "by sigstore (keyless)" in e2.message
