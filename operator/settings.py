"""The operator's settings: one dataclass, filled from the command line (``loraplane-operator --help``)."""

from __future__ import annotations

from dataclasses import dataclass, field

LEDGER_NAME = "loraplane-id-ledger"
RECOVER_ANNOTATION = "loraplane.io/recover-ledger"


@dataclass
class OperatorSettings:
    namespaces: list[str] = field(default_factory=list)
    """Namespaces to watch; empty means cluster-wide (every namespace)."""

    kubeconfig: str | None = None
    """Path to a kubeconfig; None uses $KUBECONFIG, ~/.kube/config or the in-cluster service account."""

    ledger_namespace: str = "loraplane-system"
    """Namespace of the ID ledger ConfigMap (normally the operator's own namespace)."""

    ledger_name: str = LEDGER_NAME
    """Name of the ID ledger ConfigMap; its data.next is the next ID never handed out."""

    block_size: int = 64
    """IDs reserved per ledger write (count). Larger blocks mean fewer writes and bigger gaps after a crash."""

    recover_ledger: bool = False
    """Recreate a missing or corrupted ledger at max(visible IDs) + safety_gap instead of stopping."""

    safety_gap: int = 10000
    """IDs skipped above the highest visible ID on recovery (count). Must exceed the IDs other replicas may
    still hold in reserved blocks (block_size x replicas) and any ID cached by a worker but no longer visible."""

    heartbeat_window: float = 60.0
    """Seconds since a LoRAWorker's status.heartbeatTime after which its reports stop counting."""

    liveness_interval: float = 5.0
    """Seconds between re-checks of worker heartbeats and pods, and retries of adapters waiting for an ID."""

    metrics_port: int = 8080
    """Port of the Prometheus /metrics endpoint; 0 disables it."""

    metrics_address: str = "0.0.0.0"
    """Address the /metrics endpoint binds to."""
    log_format: str = "text"
    """Log line format: text, or json (one object per line, the same fields as the worker's)."""
    health_port: int = 0
    """Port of kopf's liveness endpoint (GET /healthz: the operator's watches and handlers are alive);
    0 (the default, so several operators can run on one host) disables it; the Helm chart sets it.
    Separate from /metrics so a probe tests the operator, not only the process."""

    peering: bool = False
    """Use kopf peering (needs the KopfPeering CRDs). Only reduces double work; IDs are unique without it."""

    shard_index: int = 0
    """This replica's index in [0, shard_count) (for a StatefulSet: the pod ordinal)."""

    shard_count: int = 1
    """Replicas sharing the work (count). Each acts at once on adapters whose uid hashes to its index and
    on the others only after shard_grace, so a dead replica's share is still done. Efficiency only:
    IDs are unique whatever these say."""

    shard_grace: float = 2.0
    """Seconds a replica waits before acting on an adapter of another replica's shard."""

    report_window: float = 0.5
    """Seconds over which changes in workers' reports are gathered before the adapters they touch are
    recomputed: W workers that turn one adapter Ready within the window cost one status write, not W."""

    bbr_namespace: str = ""
    """Namespace of the body-based-routing ConfigMaps (bbr.py) the operator keeps current: one per base
    model, mapping its served names to it for the Gateway API Inference Extension's body-based router.
    Empty (the default) turns it off. Use the namespace BBR reads (its NAMESPACE)."""

    bbr_window: float = 1.0
    """Seconds over which adapter changes are gathered before the ConfigMaps are rewritten: a burst of
    adapters costs one write per ConfigMap, not one per adapter."""

    bbr_resync: float = 60.0
    """Seconds between re-reads of the managed ConfigMaps, which repair one edited or deleted by hand."""

    bbr_max_bytes: int = 900_000
    """Bytes of adapter names one ConfigMap holds at most (Kubernetes refuses objects above 1 MiB); a base
    model with more is split over 2, 4, 8, ... ConfigMaps."""

    demand_waiting: int = 4
    """Requests waiting per replica (count, summed over an adapter's workers' status.waiting) at or above
    which an adapter's demand is high (docs/operator.md, Placement)."""

    demand_up_seconds: float = 30.0
    """Seconds demand must stay high before one replica is added (up to the pool's --max-replicas)."""

    demand_down_seconds: float = 300.0
    """Seconds with no request waiting before one replica added by demand is given back; much longer
    than demand_up_seconds, so a load around the threshold never flaps."""

    write_retries: int = 8
    """Attempts at a resourceVersion-checked write before giving up until the next event (count)."""
