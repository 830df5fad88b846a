"""Provenance: an adapter's files pinned by digest, and their OpenSSF model signature checked.

The canonical manifest of an adapter is the OpenSSF model-signing manifest of its files, serialized
by file with sha256 (the library's default): one ``(relative POSIX path, sha256 of the bytes)`` per
adapter file (adapter_config.json, adapter_model.safetensors), sorted by path. Its digest is the
manifest's root digest, the one a model-signing statement carries as its subject: sha256 over the
per-file digests (raw 32-byte values) in that order, written ``sha256:<64 hex>``. So a signature over
exactly the adapter files names the same digest as ``spec.digest``, and ``loraplane validate --digest
DIR`` prints it. The per-file sha256s are the ones the cache computed as the bytes arrived, so
neither check reads the files again. Files loraplane never fetches (README.md, checkpoints) are
outside the manifest: they cannot change what is served.

Signatures are sigstore bundles as ``model_signing sign`` writes them (``model.sig`` beside the
files). The library checks the bundle against the pool's trust material (public keys, a certificate
chain, or sigstore keyless with an identity and issuer) and returns the signed manifest; each
fetched file must appear in it with the same digest. Failures are named: SignatureMissing,
SignatureInvalid (naming the file that differs), UntrustedSigner. All are permanent: the same bytes
and the same trust give the same answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplane.errors import LoraplaneError, PermanentError
from loraplane.worker import chattemplate
from loraplane.worker.inference.peft import ADAPTER_FILES
from loraplane.worker.inference.peft import SIGNATURE_FILE as SIGNATURE_FILE

log = logging.getLogger(__name__)

DIGEST_MISMATCH = "DigestMismatch"
SIGNATURE_MISSING = "SignatureMissing"
SIGNATURE_INVALID = "SignatureInvalid"
UNTRUSTED_SIGNER = "UntrustedSigner"
REASONS = (DIGEST_MISMATCH, SIGNATURE_MISSING, SIGNATURE_INVALID, UNTRUSTED_SIGNER)
SIGNING_UNAVAILABLE = "SigningUnavailable"  # model-signing is not installed: nothing was checked
TRUST_ROOT_UNAVAILABLE = "TrustRootUnavailable"  # Sigstore's trust root cannot be loaded (retried)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
SIGN_HINT = (
    "sign the adapter's files with `model_signing sign key DIR --private_key KEY` "
    "(or `certificate` / `sigstore`), which writes DIR/model.sig; see docs/provenance.md"
)


def digest_of(files: Mapping[str, str]) -> str:
    """``sha256:<hex>``: the root digest of the manifest {relative path: sha256 hex} (model-signing's subject)."""
    root = hashlib.sha256()
    for name in sorted(files):
        value = files[name]
        if not _HEX64.match(value):
            raise ValueError(f"{name}: {value!r} is not a sha256 hex digest")
        root.update(bytes.fromhex(value))
    return f"sha256:{root.hexdigest()}"


SIGNED_FILES = (*ADAPTER_FILES, *chattemplate.FILES)
"""What spec.digest and a signature cover: every file a worker fetches but the signature itself (an
adapter's own chat template changes its outputs as much as its weights)."""


def file_digests(directory: Path) -> dict[str, str]:
    """{name: sha256 hex} of the signed files in a directory (for the CLI; the worker has them already)."""
    out = {}
    for name in SIGNED_FILES:
        if name not in ADAPTER_FILES and not (Path(directory) / name).is_file():
            continue  # the adapter ships no template of its own
        h = hashlib.sha256()
        with open(Path(directory) / name, "rb") as f:
            while chunk := f.read(4 << 20):
                h.update(chunk)
        out[name] = h.hexdigest()
    return out


@dataclass(frozen=True)
class Trust:
    """Whom a worker pool (or the CLI) trusts to sign adapters. Paths come from a mounted Secret or ConfigMap."""

    public_keys: tuple[Path, ...] = ()
    """PEM public keys (EC P-256/384/521) whose signatures are accepted."""
    certificate_chain: tuple[Path, ...] = ()
    """PEM certificates (roots and intermediates) a signing certificate must chain to."""
    sigstore_identity: str = ""
    """Sigstore keyless: the signer identity (e.g. an e-mail or a CI workflow URI) that must be in the certificate."""
    sigstore_issuer: str = ""
    """Sigstore keyless: the OIDC issuer that must have vouched for the identity."""
    sigstore_trust_config: Path | None = None
    """Sigstore keyless: a trust configuration (private Sigstore instance). None: the public good instance."""

    @property
    def configured(self) -> bool:
        return bool(self.public_keys or self.certificate_chain or self.sigstore_identity)

    def describe(self) -> str:
        parts = [f"public key {p.name}" for p in self.public_keys]
        if self.certificate_chain:
            parts.append("certificates chaining to " + ", ".join(p.name for p in self.certificate_chain))
        if self.sigstore_identity:
            parts.append(f"sigstore identity {self.sigstore_identity} from {self.sigstore_issuer}")
        return "; ".join(parts) or "nothing"


def check_digest(want: str, got: str, where: str) -> None:
    """Raise DigestMismatch (both values named) unless the fetched files hash to the pinned digest."""
    if want != got:
        raise PermanentError(
            DIGEST_MISMATCH,
            f"{where}: the files hash to {got}, not the pinned spec.digest {want}; they changed at the "
            "source since it was pinned, or the pin is wrong (`loraplane validate --digest DIR` prints it)",
        )


def verify(signature: Path, files: Mapping[str, str], trust: Trust, where: str = "") -> str:
    """Verify ``signature`` over the fetched ``files`` ({name: sha256 hex}); returns who signed.

    Raises:
        PermanentError: SignatureMissing, SignatureInvalid (naming the file that differs), UntrustedSigner.
    """
    where = where or str(signature.parent)
    if not signature.is_file():
        raise PermanentError(
            SIGNATURE_MISSING, f"{where}: no {SIGNATURE_FILE} beside the adapter files; {SIGN_HINT}"
        )
    if not trust.configured:
        raise PermanentError(
            UNTRUSTED_SIGNER,
            f"{where}: a signature is required but no trust material is configured "
            "(worker --signature-public-keys / --signature-certificate-chain / --signature-identity; "
            "chart signing.trust)",
        )
    try:
        import model_signing  # noqa: F401  (the extra may be missing where only the CLI is installed)
    except ImportError as e:
        raise PermanentError(
            SIGNING_UNAVAILABLE, f"verifying signatures needs `pip install 'loraplane[signing]'` ({e})"
        ) from None
    manifest, signer = _verified_manifest(signature, trust, where)
    _compare(manifest, files, where)
    return signer


def _verified_manifest(signature: Path, trust: Trust, where: str) -> tuple[Any, str]:
    """The signed manifest and the signer, once the bundle verifies against the trust material."""
    try:
        material = json.loads(signature.read_text(encoding="utf-8"))["verificationMaterial"]
        if not isinstance(material, dict):
            raise TypeError("verificationMaterial is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PermanentError(
            SIGNATURE_INVALID,
            f"{where}: {SIGNATURE_FILE} is not a sigstore bundle ({_short(e)}); {SIGN_HINT}",
        ) from None
    # Keyless (Sigstore) bundles carry transparency-log entries; model-signing's key and certificate
    # bundles carry none.
    keyless = bool(material.get("tlogEntries"))
    if keyless and trust.sigstore_identity:
        return _with_sigstore(signature, trust, where)
    if not keyless and "publicKey" in material and trust.public_keys:
        return _with_key(signature, material, trust, where)
    if not keyless and "x509CertificateChain" in material and trust.certificate_chain:
        return _with_chain(signature, trust, where)
    how = (
        "by sigstore (keyless)"
        if keyless
        else "with a key"
        if "publicKey" in material
        else "with a certificate"
    )
    raise PermanentError(
        UNTRUSTED_SIGNER,
        f"{where}: {SIGNATURE_FILE} was signed {how}, but this pool trusts only {trust.describe()}",
    )


def _with_key(signature: Path, material: dict[str, Any], trust: Trust, where: str) -> tuple[Any, str]:
    from cryptography import exceptions
    from model_signing._signing import sign_ec_key, sign_sigstore_pb

    hint = ((material.get("publicKey") or {}).get("hint")) or ""
    last: Exception | None = None
    for key in trust.public_keys:
        try:
            verifier = sign_ec_key.Verifier(key)
        except (OSError, ValueError) as e:
            raise PermanentError(
                UNTRUSTED_SIGNER, f"trusted public key {key} cannot be read: {_short(e)}"
            ) from None
        if hint and hint != _key_hint(verifier):
            continue  # signed by another key: try the next trusted one
        try:
            return verifier.verify(sign_sigstore_pb.Signature.read(signature)), f"key {key.name}"
        except exceptions.InvalidSignature as e:
            last = e
        except (ValueError, KeyError, TypeError) as e:
            raise PermanentError(SIGNATURE_INVALID, f"{where}: {SIGNATURE_FILE}: {_short(e)}") from None
    if last is not None:
        raise PermanentError(
            SIGNATURE_INVALID,
            f"{where}: {SIGNATURE_FILE}'s signature does not match its signed manifest (the bundle was altered)",
        )
    raise PermanentError(
        UNTRUSTED_SIGNER,
        f"{where}: {SIGNATURE_FILE} was signed by a key that is not trusted here (key hint "
        f"{hint[:16] or 'none'}...); trusted: {trust.describe()}",
    )


def _key_hint(verifier: Any) -> str:
    """model-signing's key identifier: sha256 of the PEM public key."""
    from cryptography.hazmat.primitives import serialization

    pem = verifier._public_key.public_bytes(
        encoding=serialization.Encoding.PEM, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(pem).hexdigest()


def _with_chain(signature: Path, trust: Trust, where: str) -> tuple[Any, str]:
    from cryptography import exceptions, x509
    from model_signing._signing import sign_certificate, sign_sigstore_pb
    from OpenSSL import crypto

    try:
        verifier = sign_certificate.Verifier(list(trust.certificate_chain))
    except (OSError, ValueError) as e:
        raise PermanentError(UNTRUSTED_SIGNER, f"trusted certificates cannot be read: {_short(e)}") from None
    try:
        sig = sign_sigstore_pb.Signature.read(signature)
        chain = sig.bundle.verification_material.x509_certificate_chain
        if chain is None or not chain.certificates:
            raise ValueError("the bundle has no signing certificate")
        leaf = x509.load_der_x509_certificate(chain.certificates[0].raw_bytes)
        signer = f"certificate {leaf.subject.rfc4514_string()}"
        return verifier.verify(sig), signer
    except crypto.X509StoreContextError as e:
        raise PermanentError(
            UNTRUSTED_SIGNER,
            f"{where}: the signing certificate does not chain to the trusted certificates "
            f"({trust.describe()}): {_short(e)}",
        ) from None
    except exceptions.InvalidSignature:
        raise PermanentError(
            SIGNATURE_INVALID,
            f"{where}: {SIGNATURE_FILE}'s signature does not match its signed manifest (the bundle was altered)",
        ) from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        reason = UNTRUSTED_SIGNER if "cannot be used for signing" in str(e) else SIGNATURE_INVALID
        raise PermanentError(reason, f"{where}: {SIGNATURE_FILE}: {_short(e)}") from None


def _with_sigstore(signature: Path, trust: Trust, where: str) -> tuple[Any, str]:
    """Sigstore keyless (Fulcio certificate + Rekor entry); needs the trust root, hence the network."""
    from model_signing._signing import sign_sigstore

    try:  # fetches Sigstore's trust root (TUF) unless a trust configuration is given
        verifier = sign_sigstore.Verifier(
            identity=trust.sigstore_identity,
            oidc_issuer=trust.sigstore_issuer,
            trust_config=trust.sigstore_trust_config,
        )
    except Exception as e:  # the network or the trust configuration: nothing was judged yet
        raise LoraplaneError(
            TRUST_ROOT_UNAVAILABLE,
            f"{where}: cannot load Sigstore's trust root to verify {SIGNATURE_FILE}: {_short(e)}",
            retry=True,
        ) from None
    try:
        return verifier.verify(sign_sigstore.Signature.read(signature)), f"sigstore {trust.sigstore_identity}"
    except Exception as e:  # sigstore's VerificationError covers identity, issuer and signature alike
        raise PermanentError(
            UNTRUSTED_SIGNER,
            f"{where}: sigstore verification against identity {trust.sigstore_identity} "
            f"({trust.sigstore_issuer}) failed: {_short(e)}",
        ) from None


def _compare(manifest: Any, files: Mapping[str, str], where: str) -> None:
    """Every fetched file is in the signed manifest with the same sha256 (files loraplane never fetches
    may be signed too: they are not served)."""
    method = manifest.serialization_type
    if method.get("method") != "files" or method.get("hash_type") != "sha256":
        raise PermanentError(
            SIGNATURE_INVALID,
            f"{where}: signed with {method.get('method')}/{method.get('hash_type')} serialization; loraplane "
            "checks file-level sha256 manifests (model_signing's default: sign without --use_shards "
            "and --hash_algorithm)",
        )
    signed = {rd.identifier: rd.digest.digest_hex for rd in manifest.resource_descriptors()}
    for name in sorted(files):
        if name not in signed:
            raise PermanentError(
                SIGNATURE_INVALID,
                f"{where}: {name} is not covered by the signature (signed: {sorted(signed)})",
            )
        if signed[name] != files[name]:
            raise PermanentError(
                SIGNATURE_INVALID,
                f"{where}: {name} differs from the signed file: signed sha256 {signed[name]}, "
                f"actual {files[name]}",
            )
    extra = sorted(set(signed) - set(files))
    if extra:
        log.debug("%s: signed files not fetched (not served): %s", where, extra)


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:300]
