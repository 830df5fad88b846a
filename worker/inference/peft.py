"""A PEFT LoRA adapter as the worker reads it: adapter_config.json and the safetensors header, once.

In the spirit of vLLM's ``PEFTHelper``: ``PeftCheckpoint.read`` builds one object from the config
(size-capped) and the weights' header (tensorfile: no torch, never a pickle); ``problems`` lists
every reason it cannot be served on a given base model, collected rather than raised one by one.
Validation (validate.py) and the built-in engine's loader (builtin/runner.py) both go through it, so an
adapter that is Ready is one the engine loads, and both refuse the same things with the same words.
Per-module rank and alpha follow PEFT's rule (rank_pattern / alpha_pattern keys match a dotted
suffix of the module name, as regexes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplane.errors import PermanentError, ValidationFailed
from loraplane.worker.inference import tensorfile
from loraplane.worker.inference.basemodel import (
    BLOCKS,
    FILE_MISSING,
    MAX_CONFIG_BYTES,
    ModelConfig,
    read_json,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
SIGNATURE_FILE = "model.sig"  # an OpenSSF model signature (sigstore bundle), as `model_signing sign` names it
EMBEDDING_MODULES = ("embed_tokens", "lm_head")

# --- reasons (the worker's, the CLI's and the engine's) ------------------------------------------
PICKLE_REFUSED = "PickleRefused"
MALFORMED_CONFIG = "MalformedConfig"
MALFORMED_WEIGHTS = tensorfile.MALFORMED_WEIGHTS
TRUNCATED_WEIGHTS = tensorfile.TRUNCATED_WEIGHTS
HEADER_TOO_LARGE = tensorfile.HEADER_TOO_LARGE
UNSUPPORTED_ADAPTER_TYPE = "UnsupportedAdapterType"
UNSUPPORTED_FEATURE = "UnsupportedFeature"
DORA_NOT_SUPPORTED = "DoRANotSupported"
BIAS_NOT_SUPPORTED = "BiasNotSupported"
MODULES_TO_SAVE_NOT_SUPPORTED = "ModulesToSaveNotSupported"
EMBEDDING_CHANGE_NOT_SUPPORTED = "EmbeddingChangeNotSupported"
UNKNOWN_TARGET_MODULE = "UnknownTargetModule"
SHAPE_MISMATCH = "ShapeMismatch"
INCOMPLETE_PAIR = "IncompleteLoraPair"
LAYER_OUT_OF_RANGE = "LayerOutOfRange"
RANK_TOO_LARGE = "RankTooLarge"
NO_LORA_WEIGHTS = "NoLoraWeights"
UNSUPPORTED_DTYPE = "UnsupportedDtype"
NON_FINITE_WEIGHTS = "NonFiniteWeights"
UNREPRESENTABLE_WEIGHTS = "UnrepresentableWeights"

#: The largest value an activation may reach in each serving dtype: float16's largest finite value;
#: for bfloat16 and float32, 2**64, whose square is float32's largest (RMSNorm's variance and attention
#: scores square activations, in float32).
ACTIVATION_LIMITS = {"float16": 65504.0, "bfloat16": 2.0**64, "float32": 2.0**64}

#: adapter_config.json fields whose truthy value the engine cannot serve: (field, reason, message).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
UNSUPPORTED_FEATURES: tuple[tuple[str, str, str], ...] = (
    ("use_dora", DORA_NOT_SUPPORTED, "DoRA adapters are not supported; train a plain LoRA"),
    ("trainable_token_indices", EMBEDDING_CHANGE_NOT_SUPPORTED, "trained token embeddings are not supported"),
    ("target_parameters", UNSUPPORTED_FEATURE, "LoRA on raw parameters (MoE experts) is not supported"),
    ("layer_replication", UNSUPPORTED_FEATURE, "layer replication changes the model's depth; not supported"),
    ("alora_invocation_tokens", UNSUPPORTED_FEATURE, "activated LoRA (aLoRA) is not supported"),
    ("use_qalora", UNSUPPORTED_FEATURE, "QA-LoRA is not supported"),
)
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_MODULE = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+))$")


class Problems:
    """Collects (reason, message), at most three messages per reason so a bad adapter stays readable."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.extra: dict[str, int] = {}

    def add(self, reason: str, message: str) -> None:
        if sum(1 for r, _ in self.items if r == reason) >= 3:
            self.extra[reason] = self.extra.get(reason, 0) + 1
        elif (reason, message) not in self.items:
            self.items.append((reason, message))

    def all(self) -> list[tuple[str, str]]:
        return self.items + [(r, f"and {n} more {r} problems") for r, n in self.extra.items()]


@dataclass(frozen=True)
class LoraModule:
    """One patched linear: where its A / B tensors are and the rank and alpha PEFT gives it."""

    layer: int
    proj: str
    name: str
    """The module's name in the base model (model.layers.0.self_attn.q_proj)."""
    a: tensorfile.Tensor
    b: tensorfile.Tensor
    rank: int
    alpha: float


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class PeftCheckpoint:
    """One adapter directory, read: its config's fields, its tensors, and what is wrong with them."""

    path: Path
    r: int
    alpha: float
    use_rslora: bool
    modules: tuple[LoraModule, ...]
    header: tensorfile.Header
    base_model_name_or_path: str | None
    layers_to_transform: frozenset[int] | None
    config_targets: tuple[str, ...]
    """target_modules as listed in the config (empty when it is a regex)."""
    intrinsic: tuple[tuple[str, str], ...]
    """Problems found without a base model (unsupported features, malformed fields, stray tensors)."""

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def rank(self) -> int:
        """The largest rank of any patched module (what a slot must hold)."""
        return max((m.rank for m in self.modules), default=self.r)

    @property
    def scaling(self) -> float:
        """The adapter-wide scaling (lora_alpha / r, or / sqrt(r) with rsLoRA)."""
        return self.scale(self.r, self.alpha)

    def scale(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({m.proj for m in self.modules}))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({m.layer for m in self.modules}))

    # --- reading ---------------------------------------------------------------------------------
    @classmethod
    def read(cls, adapter_dir: Path) -> PeftCheckpoint:
        """Read the config and the header; what cannot be read at all is raised at once.

        Raises:
            PermanentError: PickleRefused, FileMissing (no weights).
            ValidationFailed: the config or the header cannot be read (FileMissing, TooLarge,
                MalformedConfig, MalformedWeights, TruncatedWeights, HeaderTooLarge).
        """
        adapter_dir = Path(adapter_dir)
        weights = adapter_dir / WEIGHTS_FILE
        if not weights.is_file():
            if (adapter_dir / PICKLE_FILE).exists():
                raise PermanentError(
                    PICKLE_REFUSED,
                    f"{adapter_dir} has {PICKLE_FILE} (pickled weights, never unpickled) but no {WEIGHTS_FILE}; "
                    "re-save with save_pretrained(safe_serialization=True)",
                )
            raise PermanentError(FILE_MISSING, f"{adapter_dir} has no {WEIGHTS_FILE}")
        p = Problems()
        cfg: dict[str, Any] | None = None
        header: tensorfile.Header | None = None
        try:
            cfg = read_json(adapter_dir / CONFIG_FILE, MAX_CONFIG_BYTES, MALFORMED_CONFIG)
        except PermanentError as e:
            p.add(e.reason, e.message)
        try:
            header = tensorfile.read_header(weights)
        except PermanentError as e:
            p.add(e.reason, e.message)
        if cfg is None or header is None:
            raise ValidationFailed(p.all())
        try:
            return cls._build(adapter_dir, cfg, header, p)
        except (TypeError, ValueError, AttributeError, KeyError, re.error) as e:  # a field of the wrong type
            raise ValidationFailed(
                [(MALFORMED_CONFIG, f"{CONFIG_FILE} has a field of the wrong type ({type(e).__name__}: {e})")]
            ) from e

    @classmethod
    def _build(
        cls, adapter_dir: Path, cfg: dict[str, Any], header: tensorfile.Header, p: Problems
    ) -> PeftCheckpoint:
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            p.add(
                UNSUPPORTED_ADAPTER_TYPE,
                f"peft_type {peft_type!r} is not supported; only LoRA adapters are served",
            )
        r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            p.add(MALFORMED_CONFIG, f"{CONFIG_FILE}: r must be a positive integer, got {r!r}")
            r = 1
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            p.add(MALFORMED_CONFIG, f"{CONFIG_FILE}: lora_alpha must be a number, got {alpha!r}")
            alpha = float(r)
        patterns: dict[str, dict[str, Any]] = {}
        for key in ("rank_pattern", "alpha_pattern"):
            value = cfg.get(key) or {}
            if not isinstance(value, dict):
                p.add(MALFORMED_CONFIG, f"{CONFIG_FILE}: {key} must be an object")
                value = {}
            for k, v in list(value.items()):
                re.compile(k)  # a broken regex is a malformed config, not a crash later
                if isinstance(v, bool) or not (
                    isinstance(v, int) and v > 0
                    if key == "rank_pattern"
                    else isinstance(v, (int, float)) and math.isfinite(v)
                ):
                    kind = "a positive integer" if key == "rank_pattern" else "a finite number"
                    p.add(MALFORMED_CONFIG, f"{CONFIG_FILE}: {key}[{k!r}] must be {kind}, got {v!r}")
                    value = {x: y for x, y in value.items() if x != k}
            patterns[key] = value
        for key, reason, message in UNSUPPORTED_FEATURES:
            if cfg.get(key):
                p.add(reason, f"{key} is set ({cfg[key]!r}): {message}")
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
            # PiSSA, OLoRA, CorDA and LoftQ subtract the adapter's start from the base weights: served on
            # the unmodified base model such an adapter gives wrong outputs. PEFT can convert it to plain LoRA.
            p.add(UNSUPPORTED_FEATURE,
                  f"init_lora_weights={init!r} changes the base model's weights; save the adapter with PEFT's "
                  "path_initial_model_for_weight_conversion to get a plain LoRA")  # fmt: skip
        bias = cfg.get("bias", "none")
        if bias not in (None, "none") or cfg.get("lora_bias"):
            p.add(BIAS_NOT_SUPPORTED,
                  f"bias={bias!r} / lora_bias: adapters that train biases are not supported; use bias='none'")  # fmt: skip
        saved = cfg.get("modules_to_save") or []
        for m in [saved] if isinstance(saved, str) else list(saved):
            if str(m).split(".")[-1] in EMBEDDING_MODULES:
                p.add(EMBEDDING_CHANGE_NOT_SUPPORTED,
                      f"modules_to_save replaces {m}: changing the embeddings or lm_head is not supported; drop it")  # fmt: skip
            else:
                p.add(MODULES_TO_SAVE_NOT_SUPPORTED,
                      f"modules_to_save includes {m!r}: full-module replacements are not supported; train LoRA only")  # fmt: skip
        targets = cfg.get("target_modules")
        if targets is not None and not isinstance(targets, (list, str)):
            p.add(
                MALFORMED_CONFIG,
                f"{CONFIG_FILE}: target_modules must be a list of names or a regex, got {targets!r}",
            )
        listed = tuple(str(t) for t in targets) if isinstance(targets, list) else ()
        for t in listed:
            if t.split(".")[-1] in EMBEDDING_MODULES:
                p.add(EMBEDDING_CHANGE_NOT_SUPPORTED,
                      f"target_modules includes {t}: LoRA on embeddings or lm_head is not supported")  # fmt: skip
        layers_cfg = cfg.get("layers_to_transform")
        allowed = None
        if layers_cfg is not None:
            allowed = frozenset(
                [int(layers_cfg)] if isinstance(layers_cfg, int) else [int(x) for x in layers_cfg]
            )
        modules = _modules(header, int(r), float(alpha), patterns, p)
        for m in modules:
            if allowed is not None and m.layer not in allowed:
                p.add(LAYER_OUT_OF_RANGE,
                      f"tensor {m.a.name} is for layer {m.layer}, outside layers_to_transform {sorted(allowed)}")  # fmt: skip
        if not modules and not p.items:
            p.add(NO_LORA_WEIGHTS, f"{WEIGHTS_FILE} holds no lora_A / lora_B tensors")
        name = cfg.get("base_model_name_or_path")
        return cls(adapter_dir, int(r), float(alpha), bool(cfg.get("use_rslora", False)), tuple(modules), header,
                   str(name) if name else None, allowed, listed, tuple(p.all()))  # fmt: skip

    # --- against a base model --------------------------------------------------------------------
    def problems(
        self, base: ModelConfig, *, max_lora_rank: int | None = None, dtype: str = "float32"
    ) -> list[tuple[str, str]]:
        """Every reason this adapter cannot be served on ``base`` in ``dtype`` (empty when it can).

        Reads the weights' values (NaN / Inf, then the update's bound) only when nothing else is wrong."""
        p = Problems()
        where = f"{base.model_type} {base.name!r}"
        for t in self.config_targets:
            if t.split(".")[-1] not in base.linear_shapes and t.split(".")[-1] not in EMBEDDING_MODULES:
                p.add(UNKNOWN_TARGET_MODULE, f"target module {t!r} does not exist in {where} "
                                             f"(its LoRA-able modules: {', '.join(base.linear_shapes)})")  # fmt: skip
        if self.layers_to_transform is not None:
            for layer in sorted(self.layers_to_transform):
                if not 0 <= layer < base.num_layers:
                    p.add(LAYER_OUT_OF_RANGE,
                          f"layers_to_transform names layer {layer} but {base.name!r} has layers 0..{base.num_layers - 1}")  # fmt: skip
        for reason, message in self.intrinsic:
            p.add(reason, message)
        for m in self.modules:
            if m.layer >= base.num_layers:
                p.add(LAYER_OUT_OF_RANGE,
                      f"tensor {m.a.name} is for layer {m.layer} but {base.name!r} has {base.num_layers} layers")  # fmt: skip
            fan_in, fan_out = base.linear_shapes[m.proj]
            for tensor, want in ((m.a, [m.rank, fan_in]), (m.b, [fan_out, m.rank])):
                if list(tensor.shape) != want:
                    side = f"takes {fan_in} inputs" if tensor is m.a else f"gives {fan_out} outputs"
                    p.add(SHAPE_MISMATCH,
                          f"tensor {tensor.name} has shape {list(tensor.shape)} but {where} {m.proj} {side} "
                          f"(hidden_size {base.hidden_size}): the adapter was trained for another base model")  # fmt: skip
        if max_lora_rank is not None and self.rank > max_lora_rank:
            where_rank = " (rank_pattern)" if self.rank != self.r else ""
            p.add(RANK_TOO_LARGE, f"rank {self.rank}{where_rank} is above this worker's maxLoraRank {max_lora_rank}; "
                                  "retrain with a smaller r or raise maxLoraRank")  # fmt: skip
        if not p.items:
            for name in tensorfile.nonfinite(self.weights, self.header):
                p.add(
                    NON_FINITE_WEIGHTS,
                    f"tensor {name} holds NaN or Inf values; the adapter diverged in training",
                )
        if not p.items:
            for m in self.modules:
                problem = self.unrepresentable(m, dtype)
                if problem:
                    p.add(UNREPRESENTABLE_WEIGHTS, problem)
        return p.all()

    def unrepresentable(self, m: LoraModule, dtype: str) -> str | None:
        """Why module ``m``'s update cannot be served in ``dtype``, or None when it can.

        Bounds from the weights alone (no forward pass): for an input whose values are at most 1 in
        magnitude (a normalized hidden state), the rank-space values ``scaling * A x`` are at most
        ``scaling * |A|`` and the update ``scaling * B A x`` at most ``scaling * |B| * |A|``, where |M|
        is M's largest row sum of absolute values (the exact bound). B's values are the engine's
        weights too. Any of these beyond ``ACTIVATION_LIMITS[dtype]`` overflows in the forward: the
        request answers NaN."""
        limit = ACTIVATION_LIMITS.get(dtype, ACTIVATION_LIMITS["float32"])
        scale = abs(self.scale(m.rank, m.alpha))
        # First from each tensor's largest value (its exponent bytes: cheap); the row sums only when
        # that coarse bound does not already show the module fits.
        a_max = m.a.shape[1] * tensorfile.max_abs_bound(self.weights, m.a)
        b_max = m.b.shape[1] * tensorfile.max_abs_bound(self.weights, m.b)
        if max(scale * a_max, b_max, scale * a_max * b_max) <= limit:
            return None
        a_row = _max_row_sum(tensorfile.values(self.weights, m.a), m.a.shape[1])
        b_row = _max_row_sum(tensorfile.values(self.weights, m.b), m.b.shape[1])
        shrink, update = scale * a_row, scale * a_row * b_row
        if max(shrink, b_row, update) <= limit:
            return None
        return (f"the LoRA update of {m.name} overflows {dtype}: for inputs of magnitude 1 it reaches "
                f"{update:.3g} (scaling {scale:g} x largest row sum of |lora_A| {a_row:.3g} x of |lora_B| "
                f"{b_row:.3g}), beyond {limit:.3g}, the most a {dtype} activation holds; the adapter "
                "diverged in training or was saved with wrong weights or scaling")  # fmt: skip

    def check(self, base: ModelConfig, *, max_lora_rank: int | None = None, dtype: str = "float32") -> None:
        """Raise ValidationFailed with every problem, if there is any."""
        problems = self.problems(base, max_lora_rank=max_lora_rank, dtype=dtype)
        if problems:
            raise ValidationFailed(problems)


def _modules(
    header: tensorfile.Header, r: int, alpha: float, patterns: dict[str, dict[str, Any]], p: Problems
) -> list[LoraModule]:
    """The patched linears, each with its A and B; stray, biased, partial or odd tensors into ``p``."""
    parts: dict[str, dict[str, tensorfile.Tensor]] = {}
    for key, t in header.tensors.items():
        foreign = foreign_tensor(key)
        if foreign is not None:
            p.add(*foreign)
            continue
        split = _split_lora_key(key)
        assert split is not None  # foreign_tensor found it a LoRA weight's name
        module, part, kind = split
        if kind == "bias":
            p.add(
                BIAS_NOT_SUPPORTED,
                f"tensor {key} is a LoRA bias: adapters that train biases are not supported",
            )
        elif module.split(".")[-1] in EMBEDDING_MODULES or part.startswith("lora_embedding"):
            p.add(EMBEDDING_CHANGE_NOT_SUPPORTED, f"tensor {key} changes {module.split('.')[-1]}: LoRA on embeddings "
                                                  "or lm_head is not supported")  # fmt: skip
        elif t.dtype not in tensorfile.FLOAT_DTYPES:
            p.add(UNSUPPORTED_DTYPE, f"tensor {key} is {t.dtype}; LoRA weights must be F32, F16, BF16 or F64")
        elif len(t.shape) != 2:
            p.add(SHAPE_MISMATCH, f"tensor {key} has shape {list(t.shape)}; LoRA weights are 2-D")
        else:
            parts.setdefault(module, {})[part] = t
    out = []
    for module, ab in parts.items():
        m = _MODULE.match(module)
        if m is None or m[4] not in BLOCKS or BLOCKS[m[4]] != m[3]:
            p.add(UNKNOWN_TARGET_MODULE, f"tensor {next(iter(ab.values())).name} patches {module!r}, which is not one "
                                         f"of the linears this worker serves ({', '.join(BLOCKS)})")  # fmt: skip
            continue
        if set(ab) != {"lora_A", "lora_B"}:
            have = next(iter(ab))
            p.add(INCOMPLETE_PAIR, f"{module} has {have} but no {'lora_B' if have == 'lora_A' else 'lora_A'}")
            continue
        a, b = ab["lora_A"], ab["lora_B"]
        rank = int(pattern_value(patterns["rank_pattern"], m[1], r))
        if a.shape[0] != rank or b.shape[1] != rank:
            p.add(SHAPE_MISMATCH, f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not both have "
                                  f"the rank {rank} that {CONFIG_FILE} gives {m[4]}")  # fmt: skip
            continue
        alpha_m = float(pattern_value(patterns["alpha_pattern"], m[1], alpha))
        out.append(LoraModule(int(m[2]), m[4], m[1], a, b, rank, alpha_m))
    return sorted(out, key=lambda m: (m.layer, m.proj))


def foreign_tensor(key: str) -> tuple[str, str] | None:
    """(reason, message) when a tensor's name alone says it is no LoRA weight the engine serves (a DoRA
    magnitude, a saved module, new embeddings), else None. The cache asks this of a safetensors header
    as soon as it arrives, so such a file is refused before the rest of it is downloaded."""
    if "lora_magnitude_vector" in key:
        return DORA_NOT_SUPPORTED, f"tensor {key} is a DoRA magnitude vector: DoRA adapters are not supported"
    if _split_lora_key(key) is not None:
        return None
    if set(key.split(".")) & set(EMBEDDING_MODULES):
        return (
            EMBEDDING_CHANGE_NOT_SUPPORTED,
            f"tensor {key} replaces the embeddings or lm_head: not supported",
        )
    return (
        MODULES_TO_SAVE_NOT_SUPPORTED,
        f"tensor {key} is not a LoRA weight (a saved module?): not supported",
    )


def _max_row_sum(values: Any, width: int) -> float:
    """The largest sum of absolute values over the rows of a row-major matrix ``width`` wide."""
    if not width or not values:
        return 0.0
    if width * 64 < len(values):  # many short rows (lora_B): sum the columns' absolute values row-wise
        columns = [map(abs, values[k::width]) for k in range(width)]
        return float(max(map(sum, zip(*columns, strict=True))))
    return float(max(sum(map(abs, values[i : i + width])) for i in range(0, len(values), width)))


def _split_lora_key(key: str) -> tuple[str, str, str] | None:
    """(module path, lora part, "weight" | "bias") for a PEFT LoRA tensor name, else None.

    PEFT names: <module>.lora_A.weight, <module>.lora_B.bias, <module>.lora_embedding_A (a parameter),
    sometimes with the adapter name after the part (<module>.lora_A.default.weight)."""
    parts = key.split(".")
    idx = next((i for i, x in enumerate(parts) if x in _LORA_PARTS), None)
    if idx is None or idx == 0 or len(parts) - idx > 3:
        return None
    rest = parts[idx + 1 :]
    kind = rest[-1] if rest and rest[-1] in ("weight", "bias") else "weight"
    return ".".join(parts[:idx]), parts[idx], kind
