"""The operator survives its API server: restarted, or back with an empty store (etcd lost, restored).

The operator must keep running and retry with backoff (never exit on a watch's 404 or a transient
error), list afresh when the server's resourceVersion went back in time (a watch resumed from a
version the new store never issued would wait forever), and keep the ledger guard: IDs it has seen
stay retired, so a new empty ledger is refused instead of handing them out again.
"""

from __future__ import annotations

import signal
import time

from support import fleet
from support.apiserver import RestartableKube, bump_resource_version, create_namespace
from support.kube import Kube
from support.procs import OperatorProc, wait_for

from loraplane.operator.settings import LEDGER_NAME

BASE = "meta-llama/Llama-2-7b-hf"


def _status(ads: fleet.Adapters, name: str) -> dict:
    try:
        return ads.get(name).get("status") or {}
    except Exception:  # the server is restarting, or the object is not there yet
        return {}


def _ledger(kube, ns: str, next_id: int) -> None:
    from kubernetes import client

    with kube.api_client() as api:
        client.CoreV1Api(api).create_namespaced_config_map(
            ns, {"metadata": {"name": LEDGER_NAME}, "data": {"next": str(next_id)}}
        )


def test_operator_survives_an_api_server_that_comes_back_empty(own_kube, tmp_path) -> None:
    kube, server = own_kube, own_kube.server
    ns = kube.create_namespace()
    # Block size 1: no IDs kept in reserve, so every ID after the reset needs the (new) ledger.
    op = OperatorProc(kube.kubeconfig, ns, tmp_path / "operator.log", args=["--block-size", "1"]).start()
    try:
        ads = fleet.Adapters(kube, ns)
        ads.create(fleet.adapter_obj("a1", "/models/a1", base_model=BASE))
        first = wait_for(lambda: _status(ads, "a1").get("id"), 60, "a1's ID")

        # Back empty, the CRDs only a few seconds later: the watches get 404, the operator keeps going.
        server.restart(empty=True)
        time.sleep(3)
        assert op.proc.poll() is None, op.log()[-3000:]
        kube.apply_crds()
        create_namespace(kube, ns)
        ads = fleet.Adapters(kube, ns)
        ads.create(fleet.adapter_obj("a2", "/models/a2", base_model=BASE))
        st = wait_for(
            lambda: (s := _status(ads, "a2")).get("phase") == "Pending" and s, 60, lambda: op.log()[-3000:]
        )
        ids = {c["type"]: c for c in st["conditions"]}["IDAssigned"]
        assert ids["status"] == "False" and ids["reason"] == "LedgerMissing", ids
        assert f"IDs up to {first} are in use" in st["message"] and "id" not in st

        # A human restores the ledger: allocation resumes from it.
        _ledger(kube, ns, 100)
        assert wait_for(lambda: _status(ads, "a2").get("id"), 60, lambda: op.log()[-3000:]) == 100

        # Back empty while the operator is paused, with CRDs, namespace and ledger in place before it
        # reconnects: its watches would resume from a resourceVersion the new store never issued.
        bump_resource_version(kube, ns, "a2")
        op.proc.send_signal(signal.SIGSTOP)
        try:
            server.restart(empty=True)
            kube.apply_crds()
            create_namespace(kube, ns)
            _ledger(kube, ns, 200)
            ads = fleet.Adapters(kube, ns)
            ads.create(fleet.adapter_obj("a3", "/models/a3", base_model=BASE))
        finally:
            op.proc.send_signal(signal.SIGCONT)
        assert wait_for(lambda: _status(ads, "a3").get("id"), 60, lambda: op.log()[-3000:]) == 200
        assert op.proc.poll() is None
        assert "resourceVersion" in op.log() and "listing everything again" in op.log()
    finally:
        op.stop()


def test_operator_started_before_its_api_server_waits_for_it(tmp_path) -> None:
    from support.procs import free_port

    from loraplane.localkube import write_kubeconfig

    port = free_port()
    kubeconfig = str(write_kubeconfig(f"http://127.0.0.1:{port}", tmp_path / "kubeconfig"))
    op = OperatorProc(kubeconfig, "team", tmp_path / "operator.log").start()
    server = RestartableKube(port=port)
    try:
        time.sleep(3)
        assert op.proc.poll() is None, op.log()[-3000:]
        server.start()
        kube = Kube(kubeconfig, server.url, True, server)
        kube.apply_crds()
        create_namespace(kube, "team")
        ads = fleet.Adapters(kube, "team")
        ads.create(fleet.adapter_obj("a1", "/models/a1", base_model=BASE))
        assert wait_for(lambda: _status(ads, "a1").get("id"), 60, lambda: op.log()[-3000:]) == 1
        ads.close()
    finally:
        op.stop()
        server.stop()


def test_a_kopf_run_that_hangs_while_stopping_is_cancelled(monkeypatch) -> None:
    """kopf's shutdown can hang (a watch waiting for a re-login that a stopping kopf never does): once
    its cleanup ran, the supervisor cancels the run after a grace period instead of hanging with it."""
    import asyncio

    from loraplane.operator import main

    monkeypatch.setattr(main, "STOP_GRACE_SECONDS", 0.2)

    async def scenario() -> tuple[str, bool]:
        stopping = asyncio.Event()

        async def hung_run() -> None:
            stopping.set()  # cleanup ran ...
            await asyncio.Event().wait()  # ... and the run never returns

        run = asyncio.ensure_future(hung_run())
        try:
            await main._bounded_stop(run, stopping)
        except RuntimeError as exc:
            return str(exc), run.cancelled()
        return "returned", run.cancelled()

    message, cancelled = asyncio.run(scenario())
    assert "hung while stopping" in message and cancelled

    async def clean() -> None:
        stopping = asyncio.Event()

        async def run_ok() -> None:
            stopping.set()
            await asyncio.sleep(0.05)

        await main._bounded_stop(asyncio.ensure_future(run_ok()), stopping)

    asyncio.run(clean())  # a run that finishes within the grace is left alone
