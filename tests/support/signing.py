"""Key pairs, a certificate chain and OpenSSF model signatures made by the tests (model-signing itself signs).

key_pair(dir, name) -> (private PEM, public PEM)        an EC P-256 key pair
certificate_chain(dir, name) -> Chain                   root CA -> signing certificate (digitalSignature)
sign_with_key(model_dir, private_key)                   model_dir/model.sig, as `model_signing sign key`
sign_with_certificate(model_dir, chain)                 model_dir/model.sig, as `model_signing sign certificate`
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SIGNATURE = "model.sig"


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def key_pair(out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    public = out_dir / f"{name}.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return _write_key(key, out_dir / f"{name}.key"), public


@dataclass(frozen=True)
class Chain:
    root: Path  # the CA certificate a verifier trusts
    certificate: Path  # the signing certificate, issued by root
    key: Path  # its private key


def certificate_chain(out_dir: Path, name: str) -> Chain:
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    later = now + dt.timedelta(days=2)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"{name} release signer"),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    root = out_dir / f"{name}-ca.pem"
    root.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert = out_dir / f"{name}-signer.pem"
    cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return Chain(root, cert, _write_key(key, out_dir / f"{name}-signer.key"))


def _hashing(ignore: tuple[str, ...]):  # type: ignore[no-untyped-def]
    import model_signing

    return model_signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE, *ignore])


def sign_with_key(model_dir: Path, private_key: Path, *, ignore: tuple[str, ...] = ()) -> Path:
    import model_signing

    out = model_dir / SIGNATURE
    config = model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key)
    config.set_hashing_config(_hashing(ignore)).sign(model_dir, out)
    return out


def sign_with_certificate(model_dir: Path, chain: Chain, *, ignore: tuple[str, ...] = ()) -> Path:
    import model_signing

    out = model_dir / SIGNATURE
    config = model_signing.signing.Config().use_certificate_signer(
        private_key=chain.key, signing_certificate=chain.certificate, certificate_chain=[chain.root]
    )
    config.set_hashing_config(_hashing(ignore)).sign(model_dir, out)
    return out
