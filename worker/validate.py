"""Check a PEFT LoRA adapter against the base model before it goes anywhere near a device.

The adapter is read by ``adapter.PeftCheckpoint`` (config + safetensors header, no torch, never a
pickle), the same reader the engine loads with, so what passes here is what the engine serves.
Every problem is collected before one ``ValidationFailed`` is raised (the vLLM
``peft_helper.validate_legal`` habit). The base model is a ``basemodel.ModelConfig``, built from
config.json alone (cross-checked against the checkpoint's safetensors header when present), so
the CLI stays light.

The same checks are a CLI: ``loraplane validate ADAPTER --base-model MODEL_DIR``, which also prints an
adapter's digest (``--digest``), checks a pin (``--expect-digest``) and verifies its OpenSSF model
signature (``--verify``) as a worker would (provenance.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter

from loraplane.crds.models import DIGEST_PATTERN
from loraplane.errors import LoraplaneError, PermanentError, ValidationFailed
from loraplane.worker import chattemplate, provenance
from loraplane.worker.inference.basemodel import ModelConfig
from loraplane.worker.inference.peft import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE, PeftCheckpoint

CONTEXT_TOO_LONG = "ContextTooLong"

VALIDATION_FAILURES = Counter(
    "loraplane_worker_validation_failures", "Adapters refused by validation, by first reason", ["reason"]
)


@dataclass(frozen=True)
class AdapterSummary:
    """What an adapter is, once it passed validation (goes into status.adapter)."""

    rank: int
    alpha: float
    scaling: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    size_bytes: int
    sha256: str
    warnings: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None
    num_tensors: int = 0
    layers: tuple[int, ...] = ()
    chat_template: str | None = None
    """The adapter's own chat template (None: the base model's serves its chat requests)."""
    chat_template_source: str = chattemplate.BASE
    """Which template its chat requests use: the adapter's file that holds it, or "base model"."""


def validate_adapter(
    adapter_dir: Path,
    base: ModelConfig,
    *,
    max_lora_rank: int,
    max_length: int | None = None,
    served_model: str | None = None,
    sha256: str | None = None,
    dtype: str = "float32",
) -> AdapterSummary:
    """Check an adapter directory against the base model; every problem is reported at once.

    ``dtype``: the serving dtype (float16, bfloat16, float32), which bounds what the update may reach.
    ``sha256`` may pass the weights digest the cache already computed (else the file is hashed).

    Raises:
        ValidationFailed: problems = [(reason, message), ...].
        PermanentError: PickleRefused, FileMissing when there is nothing to validate.
    """
    adapter_dir = Path(adapter_dir)
    try:
        a = PeftCheckpoint.read(adapter_dir)
        problems = a.problems(base, max_lora_rank=max_lora_rank, dtype=dtype)
    except LoraplaneError as e:
        VALIDATION_FAILURES.labels(e.reason).inc()
        raise
    template, template_problems = chattemplate.read(adapter_dir)
    problems += template_problems
    if max_length is not None and max_length > base.max_length:
        rope = f", RoPE scaling {base.rope_scaling['rope_type']}" if base.rope_scaling else ""
        problems.append((CONTEXT_TOO_LONG,
                         f"longContext.maxLength {max_length} is beyond the {base.max_length} tokens {base.name!r} "
                         f"reaches (max_position_embeddings {base.max_position_embeddings}{rope})"))  # fmt: skip
    if problems:
        VALIDATION_FAILURES.labels(problems[0][0]).inc()
        raise ValidationFailed(problems)
    warnings = []
    expected = served_model or base.name
    if a.base_model_name_or_path and expected and not _same_model(a.base_model_name_or_path, expected):
        warnings.append(
            f"adapter_config.json names base model {a.base_model_name_or_path!r} but this worker serves "
            f"{expected!r}; the shapes match, so it is served"
        )
    if (adapter_dir / PICKLE_FILE).exists():
        warnings.append(f"{PICKLE_FILE} is ignored (never unpickled); {WEIGHTS_FILE} is used")
    return AdapterSummary(
        rank=a.rank,
        alpha=a.alpha,
        scaling=a.scaling,
        use_rslora=a.use_rslora,
        target_modules=a.target_modules,
        size_bytes=a.weights.stat().st_size + (adapter_dir / CONFIG_FILE).stat().st_size,
        sha256=sha256 or _sha256(a.weights),
        warnings=tuple(warnings),
        base_model_name_or_path=a.base_model_name_or_path,
        num_tensors=2 * len(a.modules),
        layers=a.layers,
        chat_template=template.text,
        chat_template_source=template.source,
    )


def serving_dtype(setting: str, engine: str, device: str, base: ModelConfig) -> str:
    """The dtype a worker serves in: --dtype, or what "auto" picks (the built-in engine: float32 on
    CPU, bfloat16 on GPU; vLLM: the checkpoint's own dtype, bfloat16 when it names none)."""
    if setting != "auto":
        return setting
    if engine == "vllm":
        return base.torch_dtype if base.torch_dtype in ("float16", "float32") else "bfloat16"
    return "float32" if device == "cpu" else "bfloat16"


def _same_model(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.split("/")[-1] == b.split("/")[-1]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- the CLI -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`loraplane validate ADAPTER --base-model MODEL_DIR`: 0 valid, 1 refused, 2 cannot check."""
    ap = argparse.ArgumentParser(
        prog="loraplane validate",
        description="Check a PEFT LoRA adapter against a base model, as a worker would; print its digest "
        "(--digest), check a pinned digest (--expect-digest) and verify its OpenSSF model signature "
        "(--verify). Exit 0: valid; 1: a worker would refuse it (every reason listed); 2: it could not "
        "be checked.",
    )
    ap.add_argument(
        "adapter",
        help="adapter directory, or a path as in spec.path (org/name, hf://, s3://, /abs, file://)",
    )
    ap.add_argument(
        "--base-model",
        help="the base model's checkpoint directory (config.json); optional with --digest, --expect-digest "
        "or --verify, which then check only the files",
    )
    ap.add_argument("--max-lora-rank", type=int, default=64, help="the worker's maxLoraRank (default 64)")
    ap.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default="float16",
        help="the serving dtype the update must fit in (default float16, the narrowest)",
    )
    ap.add_argument("--max-length", type=int, default=None, help="spec.longContext.maxLength to check")
    ap.add_argument("--served-base-name", dest="served_model", help="the base-model name the worker serves")
    ap.add_argument("--revision", default=None, help="Hub revision when ADAPTER is a Hub repo")
    ap.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint when ADAPTER is s3://")
    ap.add_argument(
        "--local-roots",
        default="",
        metavar="DIR[,DIR]",
        help="check a local path as a worker with these --local-roots would (refused outside them); "
        "default: the adapter directory itself is allowed",
    )
    ap.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="json: one object on stdout (valid, exitCode, problems, warnings, summary) for pipelines",
    )
    prov = ap.add_argument_group("provenance (docs/provenance.md)")
    prov.add_argument(
        "--digest",
        action="store_true",
        help="print the adapter's digest (sha256:..., spec.digest's form); alone, only the digest is printed",
    )
    prov.add_argument("--expect-digest", metavar="sha256:HEX", help="refuse (DigestMismatch) other files")
    prov.add_argument(
        "--verify",
        action="store_true",
        help="require a valid model.sig from a trusted signer (SignatureMissing, SignatureInvalid, UntrustedSigner)",
    )
    prov.add_argument("--public-key", action="append", default=[], metavar="PEM", help="a trusted public key")
    prov.add_argument(
        "--certificate-chain", action="append", default=[], metavar="PEM", help="trusted CA certificates"
    )
    prov.add_argument("--sigstore-identity", default="", help="sigstore keyless: the trusted signer identity")
    prov.add_argument("--sigstore-issuer", default="", help="sigstore keyless: its OIDC issuer")
    args = ap.parse_args(argv)
    if not (args.base_model or args.digest or args.expect_digest or args.verify):
        ap.error("--base-model is required unless --digest, --expect-digest or --verify is given")
    if args.expect_digest and not re.fullmatch(DIGEST_PATTERN, args.expect_digest):
        ap.error(f"--expect-digest must match {DIGEST_PATTERN}, got {args.expect_digest!r}")
    with tempfile.TemporaryDirectory(prefix="loraplane-validate-") as tmp:
        code, result = _check(args, Path(tmp))
    if args.output == "json":
        print(json.dumps({"adapter": args.adapter, "baseModel": args.base_model, "exitCode": code, **result}))
    return code


def _check(args: argparse.Namespace, tmp: Path) -> tuple[int, dict[str, object]]:
    """(exit code, the JSON result); in text mode it also prints as it goes."""
    text = args.output == "text"
    result: dict[str, object] = {"valid": False, "problems": [], "warnings": [], "summary": None}
    quiet = text and args.digest and not (args.base_model or args.verify or args.expect_digest)

    def say(line: str) -> None:
        if not quiet:  # `loraplane validate --digest DIR` prints the digest alone, for scripts
            print(line, file=sys.stdout if text else sys.stderr)

    def problems(code: int, found: list[tuple[str, str]], heading: str) -> tuple[int, dict[str, object]]:
        result["problems"] = [{"reason": r, "message": m} for r, m in found]
        if text:
            print(heading, file=sys.stderr)
            for reason, message in found:
                print(f"  {reason}: {message}", file=sys.stderr)
        return code, result

    try:
        base = (
            ModelConfig.from_dir(Path(args.base_model), name=args.served_model) if args.base_model else None
        )
        adapter_dir, digests = _fetch_for_cli(args, tmp, say)
        result["digest"] = provenance.digest_of(digests)
        if quiet:
            print(result["digest"])
        say(f"digest {result['digest']} over {', '.join(sorted(digests))}")
        if args.expect_digest:
            provenance.check_digest(args.expect_digest, str(result["digest"]), str(adapter_dir))
        if args.verify:
            trust = provenance.Trust(
                public_keys=tuple(Path(p) for p in args.public_key),
                certificate_chain=tuple(Path(p) for p in args.certificate_chain),
                sigstore_identity=args.sigstore_identity,
                sigstore_issuer=args.sigstore_issuer,
            )
            signer = provenance.verify(
                adapter_dir / provenance.SIGNATURE_FILE, digests, trust, str(adapter_dir)
            )
            result["signer"] = signer
            say(f"signature OK: {provenance.SIGNATURE_FILE} signed by {signer}")
    except LoraplaneError as e:
        # A path a worker with these roots would refuse is a refusal; anything else could not be checked.
        from loraplane.worker.sources import refs

        refused = (refs.PATH_NOT_ALLOWED, refs.SYMLINK_ESCAPE, refs.INVALID_PATH, *provenance.REASONS)
        code = 1 if e.reason in refused else 2
        return problems(code, [(e.reason, e.message)], "REFUSED:" if code == 1 else "cannot check:")
    except Exception as e:  # a source failure: name it, do not trace
        return problems(2, [(type(e).__name__, str(e))], "cannot check:")
    if base is None:
        result["valid"] = True
        return 0, result
    say(f"base model {base.name} ({base.model_type}): hidden_size {base.hidden_size}, {base.num_layers} layers, "
        f"vocab {base.vocab_size}, max length {base.max_length}")  # fmt: skip
    say(f"checking {adapter_dir}: config, safetensors header, rank <= {args.max_lora_rank}, target modules, "
        f"tensor shapes, layers, dtypes, NaN / Inf, the update's bound in {args.dtype}, DoRA / bias / modules_to_save / embeddings, chat template"
        + (f", max length {args.max_length}" if args.max_length else ""))  # fmt: skip
    try:
        s = validate_adapter(adapter_dir, base, max_lora_rank=args.max_lora_rank, dtype=args.dtype,
                             max_length=args.max_length, served_model=args.served_model)  # fmt: skip
    except ValidationFailed as e:
        return problems(1, list(e.problems), f"REFUSED: {len(e.problems)} problem(s)")
    except PermanentError as e:
        return problems(1, [(e.reason, e.message)], "REFUSED:")
    result.update(
        valid=True,
        warnings=list(s.warnings),
        summary={
            "rank": s.rank, "alpha": s.alpha, "scaling": s.scaling, "useRslora": s.use_rslora,
            "targetModules": list(s.target_modules), "numTensors": s.num_tensors,
            "sizeBytes": s.size_bytes, "sha256": s.sha256, "chatTemplate": s.chat_template_source,
        },
    )  # fmt: skip
    say(f"OK: rank {s.rank}, alpha {s.alpha:g}, scaling {s.scaling:g}{' (rsLoRA)' if s.use_rslora else ''}, "
        f"targets {', '.join(s.target_modules)}, {s.num_tensors} tensors, {s.size_bytes} bytes, sha256 {s.sha256}")  # fmt: skip
    say(f"chat template: {'the ' if s.chat_template is None else 'its own, from '}{s.chat_template_source}")
    for w in s.warnings:
        say(f"WARNING: {w}")
    return 0, result


def _fetch_for_cli(
    args: argparse.Namespace, tmp: Path, say: Callable[[str], None]
) -> tuple[Path, dict[str, str]]:
    """A local directory checked against --local-roots (default: itself) and read in place; any other
    spec.path resolved and downloaded into a temporary cache. With the adapter files' sha256s."""
    from loraplane.worker import cache, prefetch, sources

    spec = args.adapter
    local = Path(spec[7:] if spec.startswith("file://") else spec)
    roots = tuple(Path(r).absolute() for r in args.local_roots.split(",") if r.strip())
    if local.is_dir() or spec.startswith(("/", "file://")):
        local = local.absolute()
        if not local.is_dir():
            raise PermanentError(sources.SOURCE_NOT_FOUND, f"{local}: no such directory")
        settings = sources.SourceSettings(local_roots=roots or (local,))
        sources.resolve(f"file://{local}", args.revision, settings)  # the worker's path rules
        return local, provenance.file_digests(local)
    settings = sources.SourceSettings(s3_endpoint_url=args.s3_endpoint_url)
    resolved = sources.resolve(spec, args.revision, settings)
    entry = prefetch.Prefetcher(
        cache.CacheIndex(tmp, 1 << 40), sources_settings=settings, retries=1
    ).prefetch(resolved)
    say(f"fetched {resolved.uri} at {resolved.resolved_revision} into {entry.path}")
    return entry.path, entry.file_digests


if __name__ == "__main__":
    sys.exit(main())
