"""``loraplane-operator``: parse flags into OperatorSettings and run kopf with the handlers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Any

from loraplane import parent
from loraplane.operator.settings import LEDGER_NAME, OperatorSettings
from loraplane.version import __version__

log = logging.getLogger("loraplane.operator")


def parse_args(argv: list[str] | None) -> tuple[OperatorSettings, bool]:
    d = OperatorSettings()
    p = argparse.ArgumentParser(
        prog="loraplane-operator",
        description="Assigns cluster-unique IDs to LoRAAdapters, owns served names, aggregates worker reports.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)"
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig path (default: $KUBECONFIG or in-cluster)")
    p.add_argument("--metrics-port", type=int, default=d.metrics_port, help="Prometheus port; 0 disables")
    p.add_argument("--metrics-address", default=d.metrics_address, help="address /metrics binds to")
    p.add_argument(
        "--health-port",
        type=int,
        default=d.health_port,
        help="port of the liveness endpoint /healthz; 0 disables",
    )
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--standalone", action="store_true", help="no kopf peering (default; IDs stay unique)")
    peer.add_argument("--peering", action="store_true", help="kopf peering (needs the KopfPeering CRDs)")
    p.add_argument(
        "--recover-ledger",
        action="store_true",
        help="recreate a missing/corrupted ID ledger above every visible ID plus --safety-gap",
    )
    p.add_argument(
        "--ledger-namespace",
        default=os.environ.get("POD_NAMESPACE", d.ledger_namespace),
        help="namespace of the ID ledger (default: $POD_NAMESPACE or loraplane-system)",
    )
    p.add_argument("--ledger-name", default=LEDGER_NAME, help="name of the ID ledger ConfigMap")
    p.add_argument("--block-size", type=int, default=d.block_size, help="IDs reserved per ledger write")
    p.add_argument("--safety-gap", type=int, default=d.safety_gap, help="IDs skipped on ledger recovery")
    p.add_argument(
        "--heartbeat-window",
        type=float,
        default=d.heartbeat_window,
        help="seconds a worker's heartbeat stays valid",
    )
    p.add_argument(
        "--liveness-interval",
        type=float,
        default=d.liveness_interval,
        help="seconds between periodic checks (worker liveness, adapters waiting for an ID)",
    )
    p.add_argument(
        "--report-window",
        type=float,
        default=d.report_window,
        help="seconds over which workers' report changes are gathered before adapters are recomputed",
    )
    p.add_argument(
        "--demand-waiting",
        type=int,
        default=d.demand_waiting,
        help="waiting requests per replica at or above which an adapter's demand is high",
    )
    p.add_argument(
        "--demand-up-seconds",
        type=float,
        default=d.demand_up_seconds,
        help="seconds of high demand before an adapter gets one more replica (up to the pool's --max-replicas)",
    )
    p.add_argument(
        "--demand-down-seconds",
        type=float,
        default=d.demand_down_seconds,
        help="seconds with nothing waiting before an adapter gives back one replica added by demand",
    )
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="INDEX/COUNT",
        help="this replica is INDEX of COUNT: acts at once on its share, on the rest after a grace "
        "period (efficiency only; IDs are unique without it)",
    )
    p.add_argument("--shard-grace", type=float, default=d.shard_grace, help="seconds before taking over")
    bbr = p.add_argument_group("body-based routing (Gateway API Inference Extension)")
    bbr.add_argument(
        "--bbr-namespace",
        default=d.bbr_namespace,
        help="keep BBR ConfigMaps (served name -> base model) in this namespace; empty: off (default)",
    )
    bbr.add_argument(
        "--bbr-window",
        type=float,
        default=d.bbr_window,
        help="seconds adapter changes are gathered per write",
    )
    bbr.add_argument(
        "--bbr-resync", type=float, default=d.bbr_resync, help="seconds between repairs of the ConfigMaps"
    )
    bbr.add_argument(
        "--bbr-max-bytes",
        type=int,
        default=d.bbr_max_bytes,
        help="bytes of adapter names per ConfigMap before a base model's are split over several",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="debug logs")
    p.add_argument("--version", action="version", version=f"loraplane-operator {__version__}")
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=d.log_format,
        help="text, or json: one object per line with the same fields as the worker's",
    )
    a = p.parse_args(argv)
    if a.demand_waiting < 1 or a.demand_up_seconds < 0 or a.demand_down_seconds < a.demand_up_seconds:
        p.error(
            "--demand-waiting must be >= 1, --demand-up-seconds >= 0 and --demand-down-seconds >= "
            "--demand-up-seconds (a longer quiet window is what keeps replicas from flapping)"
        )
    if a.report_window < 0:
        p.error("--report-window must be >= 0 (seconds)")
    if a.block_size < 1 or a.safety_gap < 0 or a.heartbeat_window <= 0 or a.liveness_interval <= 0:
        p.error(
            "--block-size must be >= 1, --safety-gap >= 0, --heartbeat-window and --liveness-interval > 0"
        )
    if a.bbr_window < 0 or a.bbr_resync <= 0 or not 1000 <= a.bbr_max_bytes <= 1_000_000:
        p.error("--bbr-window must be >= 0, --bbr-resync > 0, --bbr-max-bytes within 1000..1000000 (bytes)")
    try:
        index, count = (int(x) for x in a.shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        p.error(f"--shard must be INDEX/COUNT with 0 <= INDEX < COUNT, for example 0/3 (got {a.shard!r})")
    return OperatorSettings(
        shard_index=index,
        shard_count=count,
        shard_grace=a.shard_grace,
        namespaces=list(a.namespace),
        kubeconfig=a.kubeconfig,
        ledger_namespace=a.ledger_namespace,
        ledger_name=a.ledger_name,
        block_size=a.block_size,
        recover_ledger=a.recover_ledger,
        safety_gap=a.safety_gap,
        heartbeat_window=a.heartbeat_window,
        liveness_interval=a.liveness_interval,
        report_window=a.report_window,
        demand_waiting=a.demand_waiting,
        demand_up_seconds=a.demand_up_seconds,
        demand_down_seconds=a.demand_down_seconds,
        metrics_port=a.metrics_port,
        metrics_address=a.metrics_address,
        log_format=a.log_format,
        health_port=a.health_port,
        peering=a.peering,
        bbr_namespace=a.bbr_namespace,
        bbr_window=a.bbr_window,
        bbr_resync=a.bbr_resync,
        bbr_max_bytes=a.bbr_max_bytes,
    ), a.verbose


def _fail(message: str) -> int:
    """One line on stderr naming the problem and its fix; exit code 2, as the worker's config errors."""
    print(f"loraplane-operator: {message}", file=sys.stderr)
    return 2


def _port_taken(flag: str, address: str, port: int) -> str | None:
    """Bind the port for a moment: a taken one becomes a one-line error now, not a traceback later."""
    if not port:
        return None
    try:
        with socket.create_server((address, port)):
            return None
    except OSError as exc:
        return f"{flag} {port}: cannot listen on {address}:{port} ({exc.strerror}); pick a free port, or 0 to disable"


def main(argv: list[str] | None = None) -> int:
    parent.exit_with_parent()  # started by `loraplane demo`: stop with it, even when it is killed
    settings, verbose = parse_args(argv)
    from loraplane.errors import CredentialsError
    from loraplane.kube import load_configuration

    try:
        load_configuration(settings.kubeconfig)  # Fail now, naming the fix, rather than retry forever.
    except CredentialsError as exc:
        return _fail(
            f"{exc.message.rstrip('.')}; pass a readable kubeconfig with --kubeconfig (or $KUBECONFIG), "
            "or run in a Pod with a service account"
        )
    for flag, port in (("--metrics-port", settings.metrics_port), ("--health-port", settings.health_port)):
        taken = _port_taken(flag, settings.metrics_address, port)
        if taken:
            return _fail(taken)
    if settings.kubeconfig:
        os.environ["KUBECONFIG"] = settings.kubeconfig  # Read by the kubernetes client when imported.
    # kopf and the handlers are imported only now, so --help stays fast and needs no cluster.
    import kopf
    from prometheus_client import start_http_server

    from loraplane.operator import handlers

    kopf.configure(debug=verbose, verbose=verbose)
    # JSON: kopf's handler with our formatter (the worker's fields, plus kopf's object references).
    if settings.log_format == "json":
        from loraplane import telemetry

        for handler in logging.getLogger().handlers:
            handler.setFormatter(telemetry.formatter("operator", "json"))
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    handlers.SETTINGS = settings
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_address)
    try:
        asyncio.run(_supervise(settings))
    except KeyboardInterrupt:
        pass
    return 0


STOP_GRACE_SECONDS = 20.0  # kopf's own wait for hung tasks is 5 s, then 1 s per cancellation round


async def _bounded_stop(run: asyncio.Future[Any], stopping: asyncio.Event) -> None:
    """Wait for kopf's run; once its cleanup has run, give it ``STOP_GRACE_SECONDS`` to return, then
    cancel it. A watch whose session closed under it waits for a re-login that a stopping kopf never
    does (seen when the API server came back empty under load), so kopf's shutdown can hang for ever;
    the supervisor must not hang with it."""
    waiter: asyncio.Future[Any] = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({run, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not run.done():
        done, _ = await asyncio.wait({run}, timeout=STOP_GRACE_SECONDS)
        if not done:
            log.warning("kopf did not finish stopping within %gs; cancelling its run", STOP_GRACE_SECONDS)
            run.cancel()
            done, _ = await asyncio.wait({run}, timeout=STOP_GRACE_SECONDS)
            if not done:
                raise RuntimeError("kopf's run ignored its cancellation; it is left behind")
            if not run.cancelled() and run.exception() is not None:
                raise run.exception()  # type: ignore[misc]
            raise RuntimeError("kopf's run hung while stopping and was cancelled")
    run.result()


async def _supervise(settings: OperatorSettings) -> None:
    """Run kopf until a signal stops it. kopf ends its run on API errors it does not retry (a watch
    answered 404 because the API server came back without our CRDs, an unexpected watch ERROR event)
    and when the reconciler sees the server's store go back in time or our CRDs come and go; each time,
    kopf is started again with the same memo (the reconciler keeps the highest ID it has seen): after a
    growing backoff when its run failed, after about a second when the reconciler asked for it."""
    import kopf

    from loraplane.kube import Backoff
    from loraplane.operator import handlers

    memo = kopf.Memo()
    backoff = Backoff(start=1.0, cap=30.0)
    liveness = (
        f"http://{settings.metrics_address}:{settings.health_port}/healthz" if settings.health_port else None
    )
    loop = asyncio.get_running_loop()
    while True:
        restart = asyncio.Event()  # Set by the reconciler when the server's store went back in time.
        stopping = asyncio.Event()  # Set by the cleanup handler: kopf's run is ending.
        memo["restart"], memo["signalled"], memo["stopping"] = restart, False, stopping
        started = loop.time()
        run = asyncio.ensure_future(
            kopf.operator(
                settings=handlers.kopf_settings(),
                memo=memo,
                stop_flag=restart,
                liveness_endpoint=liveness,
                standalone=not settings.peering,
                clusterwide=not settings.namespaces,
                namespaces=settings.namespaces,
            )
        )
        try:
            await _bounded_stop(run, stopping)
        except Exception as exc:  # Whatever ended kopf's run: the API server is what comes back.
            why = f"{type(exc).__name__}: {exc}"
        else:
            if not restart.is_set() or memo["signalled"]:
                return  # SIGTERM / SIGINT: kopf stopped cleanly.
            why = "the API server's store or CRDs changed under it"
            backoff.reset()  # A planned restart, not a failure: starting again soon is the point.
        if loop.time() - started > 60:
            backoff.reset()
        wait = backoff.next()
        log.warning("operator stopped watching (%s); starting again in %.1fs", why, wait)
        stopping = asyncio.Event()  # kopf's signal handlers went with its run: ours while waiting.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), wait)
        if stopping.is_set():
            return


if __name__ == "__main__":
    sys.exit(main())
