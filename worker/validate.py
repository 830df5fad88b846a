"""Check a PEFT LoRA adapter against the base model before it goes anywhere near a device.

Reads ``adapter_config.json`` (size-capped) and only the *header* of ``adapter_model.safetensors``
(size-capped, parsed with json + struct: no torch, never a pickle), compares every lora_A / lora_B
shape with the base layer it patches, and collects every problem before raising one
``ValidationFailed`` (the vLLM ``peft_helper.validate_legal`` habit). The base model is described
by ``BaseModelInfo``, built from config.json alone (cross-checked against the checkpoint's
safetensors headers when present), so the operator image and the CLI stay light.

The same checks are a CLI: ``loraplane validate ADAPTER --base-model MODEL_DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from loraplane.crds.errors import PermanentError, ValidationFailed
from loraplane.worker import basemodel
from loraplane.worker.basemodel import BASE_MODEL_INCONSISTENT as BASE_MODEL_INCONSISTENT
from loraplane.worker.basemodel import FILE_MISSING, MAX_CONFIG_BYTES, BaseModelInfo
from loraplane.worker.basemodel import HEADER_TOO_LARGE as HEADER_TOO_LARGE
from loraplane.worker.basemodel import MALFORMED_WEIGHTS as MALFORMED_WEIGHTS
from loraplane.worker.basemodel import TOO_LARGE as TOO_LARGE
from loraplane.worker.basemodel import TRUNCATED_WEIGHTS as TRUNCATED_WEIGHTS
from loraplane.worker.basemodel import UNSUPPORTED_BASE_MODEL as UNSUPPORTED_BASE_MODEL
from loraplane.worker.basemodel import effective_max_length as effective_max_length
from loraplane.worker.basemodel import read_safetensors_header as read_safetensors_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
EMBEDDING_MODULES = ("embed_tokens", "lm_head")

# --- reasons -------------------------------------------------------------------------------------
PICKLE_REFUSED = "PickleRefused"
MALFORMED_CONFIG = "MalformedConfig"
UNSUPPORTED_ADAPTER_TYPE = "UnsupportedAdapterType"
RANK_TOO_LARGE = "RankTooLarge"
UNKNOWN_TARGET_MODULE = "UnknownTargetModule"
SHAPE_MISMATCH = "ShapeMismatch"
LAYER_OUT_OF_RANGE = "LayerOutOfRange"
DORA_NOT_SUPPORTED = "DoRANotSupported"
BIAS_NOT_SUPPORTED = "BiasNotSupported"
MODULES_TO_SAVE_NOT_SUPPORTED = "ModulesToSaveNotSupported"
EMBEDDING_CHANGE_NOT_SUPPORTED = "EmbeddingChangeNotSupported"
CONTEXT_TOO_LONG = "ContextTooLong"
NO_LORA_WEIGHTS = "NoLoraWeights"
UNSUPPORTED_FEATURE = "UnsupportedFeature"

#: adapter_config.json fields whose truthy value the engine cannot serve: (field, reason, message).
UNSUPPORTED_FEATURES: tuple[tuple[str, str, str], ...] = (
    ("use_dora", DORA_NOT_SUPPORTED, "DoRA adapters are not supported; train a plain LoRA"),
    ("trainable_token_indices", EMBEDDING_CHANGE_NOT_SUPPORTED, "trained token embeddings are not supported"),
    ("target_parameters", UNSUPPORTED_FEATURE, "LoRA on raw parameters (MoE experts) is not supported"),
    ("layer_replication", UNSUPPORTED_FEATURE, "layer replication changes the model's depth; not supported"),
    ("alora_invocation_tokens", UNSUPPORTED_FEATURE, "activated LoRA (aLoRA) is not supported"),
    ("use_qalora", UNSUPPORTED_FEATURE, "QA-LoRA is not supported"),
    ("alpha_pattern", UNSUPPORTED_FEATURE, "per-module alpha is not supported; use one lora_alpha"),
)

VALIDATION_FAILURES = Counter(
    "loraplane_worker_validation_failures", "Adapters refused by validation, by first reason", ["reason"]
)


# --- the adapter ---------------------------------------------------------------------------------
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
    layers: tuple[int, ...] = field(default=())


_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _split_lora_key(key: str) -> tuple[str, str, str] | None:
    """(module path, lora part, "weight" | "bias") for a PEFT LoRA tensor name, else None.

    PEFT names: <module>.lora_A.weight, <module>.lora_B.bias, <module>.lora_embedding_A (a parameter),
    sometimes with the adapter name after the part (<module>.lora_A.default.weight)."""
    parts = key.split(".")
    idx = next((i for i, p in enumerate(parts) if p in _LORA_PARTS), None)
    if idx is None or idx == 0 or len(parts) - idx > 3:
        return None
    rest = parts[idx + 1 :]
    kind = rest[-1] if rest and rest[-1] in ("weight", "bias") else "weight"
    return ".".join(parts[:idx]), parts[idx], kind


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class _Problems:
    """Collects (reason, message), at most a few messages per reason so a bad adapter stays readable."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.extra: dict[str, int] = {}

    def add(self, reason: str, message: str) -> None:
        if sum(1 for r, _ in self.items if r == reason) >= 3:
            self.extra[reason] = self.extra.get(reason, 0) + 1
        elif (reason, message) not in self.items:
            self.items.append((reason, message))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        out = list(self.items)
        for reason, n in self.extra.items():
            out.append((reason, f"and {n} more {reason} problems"))
        VALIDATION_FAILURES.labels(out[0][0]).inc()
        raise ValidationFailed(out)


def _module_rank(module: str, r: int, rank_pattern: dict[str, Any]) -> int:
    """PEFT's rule: a rank_pattern key matches a module path ending in it (regex)."""
    for pattern, rank in rank_pattern.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return int(rank)
    return r


def validate_adapter(
    adapter_dir: Path,
    base: BaseModelInfo,
    *,
    max_lora_rank: int,
    extra_vocab: int = 0,
    max_length: int | None = None,
    served_base_name: str | None = None,
    sha256: str | None = None,
) -> AdapterSummary:
    """Check an adapter directory against the base model; every problem is reported at once.

    ``sha256`` may pass the weights digest the cache already computed (else the file is hashed).

    Raises:
        ValidationFailed: problems = [(reason, message), ...].
        PermanentError: PickleRefused, FileMissing when there is nothing to validate.
    """
    try:
        return _validate(
            Path(adapter_dir),
            base,
            max_lora_rank=max_lora_rank,
            extra_vocab=extra_vocab,
            max_length=max_length,
            served_base_name=served_base_name,
            sha256=sha256,
        )
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # a field of the wrong type or shape
        _count(MALFORMED_CONFIG)
        raise ValidationFailed(
            [(MALFORMED_CONFIG, f"{CONFIG_FILE} has a field of the wrong type ({type(e).__name__}: {e})")]
        ) from e


def _validate(
    adapter_dir: Path,
    base: BaseModelInfo,
    *,
    max_lora_rank: int,
    extra_vocab: int,
    max_length: int | None,
    served_base_name: str | None,
    sha256: str | None,
) -> AdapterSummary:
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        if (adapter_dir / PICKLE_FILE).exists():
            _count(PICKLE_REFUSED)
            raise PermanentError(
                PICKLE_REFUSED,
                f"{adapter_dir} has {PICKLE_FILE} (pickled weights, never unpickled) but no {WEIGHTS_FILE}; "
                "re-save with save_pretrained(safe_serialization=True)",
            )
        _count(FILE_MISSING)
        raise PermanentError(FILE_MISSING, f"{adapter_dir} has no {WEIGHTS_FILE}")
    p = _Problems()
    warnings: list[str] = []
    cfg: dict[str, Any] = {}
    try:
        cfg = basemodel.read_json(adapter_dir / CONFIG_FILE, MAX_CONFIG_BYTES, MALFORMED_CONFIG)
    except PermanentError as e:
        p.add(e.reason, e.message)
    header: dict[str, dict[str, Any]] = {}
    try:
        header = basemodel.read_safetensors_header(weights)
    except PermanentError as e:
        p.add(e.reason, e.message)
    if not cfg or not header:
        p.raise_if_any()

    # The config, as in vLLM's peft_helper: every unsupported feature is its own reason.
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        p.add(
            UNSUPPORTED_ADAPTER_TYPE,
            f"peft_type {peft_type!r} is not supported; only LoRA adapters are served",
        )
    r = cfg.get("r", 8)
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        p.add(MALFORMED_CONFIG, f"{CONFIG_FILE}: r must be a positive integer, got {r!r}")
        r = 1
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        p.add(MALFORMED_CONFIG, f"{CONFIG_FILE}: lora_alpha must be a number, got {alpha!r}")
        alpha = float(r)
    rank_pattern = cfg.get("rank_pattern") or {}
    if not isinstance(rank_pattern, dict):
        p.add(MALFORMED_CONFIG, f"{CONFIG_FILE}: rank_pattern must be an object")
        rank_pattern = {}
    use_rslora = bool(cfg.get("use_rslora", False))
    for key, reason, message in UNSUPPORTED_FEATURES:
        if cfg.get(key):
            p.add(reason, f"{key} is set ({cfg[key]!r}): {message}")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none") or cfg.get("lora_bias"):
        p.add(
            BIAS_NOT_SUPPORTED,
            f"bias={bias!r} / lora_bias: adapters that train biases are not supported; use bias='none'",
        )
    modules_to_save = cfg.get("modules_to_save") or []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    for m in modules_to_save:
        if str(m).split(".")[-1] in EMBEDDING_MODULES:
            if extra_vocab <= 0:
                p.add(EMBEDDING_CHANGE_NOT_SUPPORTED,
                      f"modules_to_save replaces {m}: changing the embeddings or lm_head is not supported by this worker "
                      "(extra vocabulary 0); drop it from modules_to_save")  # fmt: skip
        else:
            p.add(MODULES_TO_SAVE_NOT_SUPPORTED,
                  f"modules_to_save includes {m!r}: full-module replacements are not supported; train LoRA only")  # fmt: skip

    known = set(base.linear_shapes)
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, (list, str)):
        p.add(
            MALFORMED_CONFIG,
            f"{CONFIG_FILE}: target_modules must be a list of names or a regex, got {targets!r}",
        )
    if isinstance(targets, list):
        for t in targets:
            name = str(t).split(".")[-1]
            if name in EMBEDDING_MODULES:
                if extra_vocab <= 0:
                    p.add(EMBEDDING_CHANGE_NOT_SUPPORTED,
                          f"target_modules includes {name}: LoRA on embeddings or lm_head is not supported by this worker")  # fmt: skip
            elif name not in known:
                p.add(UNKNOWN_TARGET_MODULE,
                      f"target module {t!r} does not exist in {base.model_type} {base.name!r} "
                      f"(its LoRA-able modules: {', '.join(sorted(known))})")  # fmt: skip
    layers_cfg = cfg.get("layers_to_transform")
    allowed_layers: set[int] | None = None
    if layers_cfg is not None:
        allowed_layers = {int(layers_cfg)} if isinstance(layers_cfg, int) else {int(x) for x in layers_cfg}
        for layer in sorted(allowed_layers):
            if not 0 <= layer < base.num_layers:
                p.add(LAYER_OUT_OF_RANGE,
                      f"layers_to_transform names layer {layer} but {base.name!r} has layers 0..{base.num_layers - 1}")  # fmt: skip

    # The tensors: every shape against the base layer it patches.
    ranks: dict[str, int] = {}
    modules: set[str] = set()
    layers_seen: set[int] = set()
    n_lora = 0
    for key, meta in header.items():
        if "lora_magnitude_vector" in key:
            p.add(
                DORA_NOT_SUPPORTED,
                f"tensor {key} is a DoRA magnitude vector: DoRA adapters are not supported",
            )
            continue
        m = _split_lora_key(key)
        if m is None:
            short = key.split(".")[-2] if key.count(".") else key
            if short in EMBEDDING_MODULES or key.split(".")[-2:-1] == ["embed_tokens"]:
                p.add(
                    EMBEDDING_CHANGE_NOT_SUPPORTED,
                    f"tensor {key} replaces the embeddings or lm_head: not supported",
                )
            else:
                p.add(
                    MODULES_TO_SAVE_NOT_SUPPORTED,
                    f"tensor {key} is not a LoRA weight (a saved module?): not supported",
                )
            continue
        module, part, kind = m
        if kind == "bias":
            p.add(
                BIAS_NOT_SUPPORTED,
                f"tensor {key} is a LoRA bias: adapters that train biases are not supported",
            )
            continue
        n_lora += 1
        name = module.split(".")[-1]
        shape = list(meta["shape"])
        if name in EMBEDDING_MODULES or part.startswith("lora_embedding"):
            _check_embedding(p, key, name, shape, base, extra_vocab)
            continue
        if name not in known:
            p.add(
                UNKNOWN_TARGET_MODULE,
                f"tensor {key} patches {name!r}, which {base.model_type} {base.name!r} does not have",
            )
            continue
        lm = _LAYER.search(module)
        if lm:
            layer = int(lm.group(1))
            layers_seen.add(layer)
            if layer >= base.num_layers:
                p.add(
                    LAYER_OUT_OF_RANGE,
                    f"tensor {key} is for layer {layer} but {base.name!r} has {base.num_layers} layers",
                )
            elif allowed_layers is not None and layer not in allowed_layers:
                p.add(
                    LAYER_OUT_OF_RANGE,
                    f"tensor {key} is for layer {layer}, outside layers_to_transform {sorted(allowed_layers)}",
                )
        modules.add(name)
        fan_in, fan_out = base.linear_shapes[name]
        if len(shape) != 2:
            p.add(SHAPE_MISMATCH, f"tensor {key} has shape {shape}; LoRA weights are 2-D")
            continue
        rank = shape[0] if part == "lora_A" else shape[1]
        expected_rank = _module_rank(module, r, rank_pattern)
        want = [rank, fan_in] if part == "lora_A" else [fan_out, rank]
        if shape != want:
            side = f"takes {fan_in} inputs" if part == "lora_A" else f"gives {fan_out} outputs"
            p.add(SHAPE_MISMATCH,
                  f"tensor {key} has shape {shape} but {base.name!r} {name} {side} "
                  f"(hidden_size {base.hidden_size}): the adapter was trained for another base model")  # fmt: skip
        if rank != expected_rank:
            p.add(
                SHAPE_MISMATCH,
                f"tensor {key} has rank {rank} but adapter_config.json gives {name} rank {expected_rank}",
            )
        if ranks.setdefault(module, rank) != rank:
            p.add(
                SHAPE_MISMATCH,
                f"{module}: lora_A and lora_B disagree on the rank ({ranks[module]} vs {rank})",
            )

    max_rank = max([r, *[int(v) for v in rank_pattern.values() if isinstance(v, int)], *ranks.values()])
    if max_rank > max_lora_rank:
        where = " (rank_pattern)" if max_rank != r else ""
        p.add(RANK_TOO_LARGE, f"rank {max_rank}{where} is above this worker's maxLoraRank {max_lora_rank}; "
                              "retrain with a smaller r or raise maxLoraRank")  # fmt: skip
    if n_lora == 0 and not p.items:
        p.add(NO_LORA_WEIGHTS, f"{WEIGHTS_FILE} holds no lora_A / lora_B tensors")
    if max_length is not None and max_length > base.max_length:
        p.add(CONTEXT_TOO_LONG,
              f"longContext.maxLength {max_length} is beyond the {base.max_length} tokens {base.name!r} reaches "
              f"(max_position_embeddings {base.max_position_embeddings}"
              f"{', rope_scaling ' + json.dumps(base.rope_scaling) if base.rope_scaling else ''})")  # fmt: skip
    p.raise_if_any()

    base_name = cfg.get("base_model_name_or_path")
    expected_name = served_base_name or base.name
    if base_name and expected_name and not _same_model(str(base_name), expected_name):
        warnings.append(
            f"adapter_config.json names base model {base_name!r} but this worker serves {expected_name!r}; "
            "the shapes match, so it is served"
        )
    if (adapter_dir / PICKLE_FILE).exists():
        warnings.append(f"{PICKLE_FILE} is ignored (never unpickled); {WEIGHTS_FILE} is used")
    scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    return AdapterSummary(
        rank=max_rank,
        alpha=float(alpha),
        scaling=float(scaling),
        use_rslora=use_rslora,
        target_modules=tuple(sorted(modules)),
        size_bytes=weights.stat().st_size + (adapter_dir / CONFIG_FILE).stat().st_size,
        sha256=sha256 or _sha256(weights),
        warnings=tuple(warnings),
        base_model_name_or_path=str(base_name) if base_name else None,
        num_tensors=n_lora,
        layers=tuple(sorted(layers_seen)),
    )


def _check_embedding(
    p: _Problems, key: str, name: str, shape: list[int], base: BaseModelInfo, extra_vocab: int
) -> None:
    if extra_vocab <= 0:
        p.add(EMBEDDING_CHANGE_NOT_SUPPORTED,
              f"tensor {key} changes {name}: LoRA on embeddings or lm_head is not supported by this worker "
              "(extra vocabulary 0)")  # fmt: skip
        return
    vocab = max(shape) if shape else 0
    if vocab > base.vocab_size + extra_vocab:
        p.add(EMBEDDING_CHANGE_NOT_SUPPORTED,
              f"tensor {key} covers {vocab} tokens, beyond the base vocabulary {base.vocab_size} + extra {extra_vocab}")  # fmt: skip


def _same_model(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.split("/")[-1] == b.split("/")[-1]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def _count(reason: str) -> None:
    VALIDATION_FAILURES.labels(reason).inc()


# --- the CLI -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`loraplane validate ADAPTER --base-model MODEL_DIR`: 0 valid, 1 refused, 2 cannot check."""
    ap = argparse.ArgumentParser(
        prog="loraplane validate",
        description="Check a PEFT LoRA adapter against a base model, as a worker would.",
    )
    ap.add_argument(
        "adapter", help="adapter directory, or a path as in spec.path (org/name, hf://, s3://, file://)"
    )
    ap.add_argument("--base-model", required=True, help="the base model's checkpoint directory (config.json)")
    ap.add_argument("--max-lora-rank", type=int, default=64, help="the worker's maxLoraRank (default 64)")
    ap.add_argument("--max-length", type=int, default=None, help="spec.longContext.maxLength to check")
    ap.add_argument(
        "--extra-vocab", type=int, default=0, help="extra vocabulary the worker allows (default 0)"
    )
    ap.add_argument("--served-base-name", default=None, help="the base-model name the worker serves")
    ap.add_argument("--revision", default=None, help="Hub revision when ADAPTER is a Hub repo")
    ap.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint when ADAPTER is s3://")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loraplane-validate-") as tmp:
        return _run_cli(args, Path(tmp))


def _run_cli(args: argparse.Namespace, tmp: Path) -> int:
    try:
        base = BaseModelInfo.from_pretrained_dir(Path(args.base_model), served_name=args.served_base_name)
        adapter_dir = _fetch_for_cli(args, tmp)
    except PermanentError as e:
        print(f"cannot check: {e.reason}: {e.message}", file=sys.stderr)
        return 2
    except Exception as e:  # a source failure: name it, do not trace
        print(
            f"cannot check: {getattr(e, 'reason', type(e).__name__)}: {getattr(e, 'message', e)}",
            file=sys.stderr,
        )
        return 2
    print(f"base model {base.name} ({base.model_type}): hidden_size {base.hidden_size}, {base.num_layers} layers, "
          f"vocab {base.vocab_size}, max length {base.max_length}")  # fmt: skip
    print(f"checking {adapter_dir}: config, safetensors header, rank <= {args.max_lora_rank}, target modules, "
          "tensor shapes, layers, DoRA / bias / modules_to_save / embeddings"
          + (f", max length {args.max_length}" if args.max_length else ""))  # fmt: skip
    try:
        s = validate_adapter(adapter_dir, base, max_lora_rank=args.max_lora_rank, extra_vocab=args.extra_vocab,
                             max_length=args.max_length, served_base_name=args.served_base_name)  # fmt: skip
    except ValidationFailed as e:
        print(f"REFUSED: {len(e.problems)} problem(s)", file=sys.stderr)
        for reason, message in e.problems:
            print(f"  {reason}: {message}", file=sys.stderr)
        return 1
    except PermanentError as e:
        print(f"REFUSED: {e.reason}: {e.message}", file=sys.stderr)
        return 1
    print(f"OK: rank {s.rank}, alpha {s.alpha:g}, scaling {s.scaling:g}{' (rsLoRA)' if s.use_rslora else ''}, "
          f"targets {', '.join(s.target_modules)}, {s.num_tensors} tensors, {s.size_bytes} bytes, sha256 {s.sha256}")  # fmt: skip
    for w in s.warnings:
        print(f"WARNING: {w}")
    return 0


def _fetch_for_cli(args: argparse.Namespace, tmp: Path) -> Path:
    """A local directory as is; any other spec.path resolved and downloaded into a temporary cache."""
    local = Path(args.adapter[7:] if args.adapter.startswith("file://") else args.adapter)
    if local.is_dir():
        return local
    from loraplane.worker import cache, sources

    settings = sources.SourceSettings(s3_endpoint_url=args.s3_endpoint_url)
    resolved = sources.resolve(args.adapter, args.revision, settings)
    entry = cache.AdapterCache(tmp, 1 << 40, sources_settings=settings, retries=1).prefetch(resolved)
    print(f"fetched {resolved.uri} at {resolved.resolved_revision} into {entry.path}")
    return entry.path


if __name__ == "__main__":
    sys.exit(main())
