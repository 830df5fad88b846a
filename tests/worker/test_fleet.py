"""Several worker processes and the real operator (subprocesses) against the API server fixture.

Two workers serve one base model and one serves another: the operator's per-adapter counts are right;
a worker's Pod deleted stops its reports counting; a worker started after 20 adapters are Ready makes
them all Ready with no user action; restarted with its cache kept, it downloads nothing; a worker
SIGKILLed mid-download leaves a consistent cache and the adapter becomes Ready after a restart.
"""

from __future__ import annotations

import pytest
from support import adapters as adapters_mod
from support import fleet, servers

hf_hub = servers.hf_hub


@pytest.fixture
def env(kube, namespace, tmp_path):
    kube.apply_crds()
    base = adapters_mod.write_base_config(tmp_path / "base")
    root = tmp_path / "adapters"
    root.mkdir()
    ads = fleet.Adapters(kube, namespace)
    with fleet.OperatorProc(kube.kubeconfig, namespace, tmp_path / "operator.log") as op:
        yield base, root, ads, op
    ads.close()


def _pod(kube, namespace, name):
    from kubernetes import client

    body = {
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "worker", "image": "loraplane-worker"}]},
    }
    with kube.api_client() as api:
        client.CoreV1Api(api).create_namespaced_pod(namespace, body)


def _delete_pod(kube, namespace, name):
    from kubernetes import client

    with kube.api_client() as api:
        client.CoreV1Api(api).delete_namespaced_pod(
            name, namespace, grace_period_seconds=0, _preload_content=False
        )


def _counts_are(ads, expected, op, workers=()):
    def check():
        got = {n: ads.counts(n) for n in expected}
        return got == expected

    def why():
        got = {n: ads.counts(n) for n in expected}
        logs = "\n".join(w.log()[-1500:] for w in workers)
        return f"counts {expected}, got {got}\n{op.log()[-2000:]}\n{logs}"

    return check, why


def test_aggregate_counts_over_workers_and_pod_deletion(kube, namespace, tmp_path, env):
    base, root, ads, op = env
    good = adapters_mod.write_adapter(root / "good")
    also = adapters_mod.write_adapter(root / "also", seed=1)
    bad = adapters_mod.write_adapter(root / "bad", r=128)
    ads.create(fleet.adapter_obj("good", str(good)))
    ads.create(fleet.adapter_obj("also", str(also)))
    ads.create(fleet.adapter_obj("bad", str(bad)))
    ads.create(fleet.adapter_obj("elsewhere", str(good), base_model="other-model"))
    _pod(kube, namespace, "w1")
    _pod(kube, namespace, "w2")

    def worker(name, served=fleet.BASE_MODEL, pod=True):
        extra = ["--max-lora-rank", "64", *(["--pod-name", name] if pod else [])]
        return fleet.WorkerProc(
            kube.kubeconfig, tmp_path, name=name, namespace=namespace, base_dir=base, local_root=root,
            served_model=served, extra=extra,
        )  # fmt: skip

    with worker("w1") as w1, worker("w2") as w2, worker("w3", "other-model", pod=False) as w3:
        two = {"ready": 2, "failed": 0, "total": 2}
        expected = {"good": two, "also": two, "bad": {"ready": 0, "failed": 2, "total": 2},
                    "elsewhere": {"ready": 1, "failed": 0, "total": 1}}  # fmt: skip
        check, why = _counts_are(ads, expected, op, (w1, w2, w3))
        fleet.wait_for(check, 40, why)
        assert ads.get("bad")["status"]["phase"] == "Failed"
        assert "RankTooLarge" in ads.get("bad")["status"]["message"]
        assert ads.get("good")["status"]["phase"] == "Ready"
        owner = next(o for o in ads.workers() if o["metadata"]["name"] == "w1")["metadata"]["ownerReferences"]
        assert owner[0]["kind"] == "Pod" and owner[0]["name"] == "w1"

        # w2's Pod is deleted: its report stops counting (its LoRAWorker goes with the Pod).
        _delete_pod(kube, namespace, "w2")
        one = {"ready": 1, "failed": 0, "total": 1}
        expected = {"good": one, "also": one, "bad": {"ready": 0, "failed": 1, "total": 1}}
        check, why = _counts_are(ads, expected, op, (w1, w2))
        fleet.wait_for(check, 30, why)
        fleet.wait_for(
            lambda: all(o["metadata"]["name"] != "w2" for o in ads.workers()), 20, "w2's report gone"
        )


def test_scale_up_and_restart_with_cache_kept(kube, namespace, tmp_path, env):
    base, root, ads, op = env
    names = [f"a{i:02d}" for i in range(20)]
    for i, n in enumerate(names):
        ads.create(fleet.adapter_obj(n, str(adapters_mod.write_adapter(root / n, seed=i))))

    def worker(name):
        return fleet.WorkerProc(
            kube.kubeconfig, tmp_path, name=name, namespace=namespace, base_dir=base, local_root=root
        )

    with worker("w1") as w1:
        check, why = _counts_are(ads, dict.fromkeys(names, {"ready": 1, "failed": 0, "total": 1}), op, (w1,))
        fleet.wait_for(check, 40, why)
        # Scale-up: a new worker makes all 20 Ready on itself, with no action from the user.
        w2 = worker("w2").start()
        try:
            check, why = _counts_are(
                ads, dict.fromkeys(names, {"ready": 2, "failed": 0, "total": 2}), op, (w1, w2)
            )
            fleet.wait_for(check, 40, why)
            assert w2.metric("loraplane_worker_cache_misses_total") == 20
            assert w2.stop() == 0
            # Restart with the cache volume kept: Ready again, nothing downloaded.
            w2.start()
            fleet.wait_for(check, 40, why)
            fleet.wait_for(lambda: w2.metrics(), 10, "metrics")
            assert w2.metric("loraplane_worker_cache_misses_total") == 0
            assert (
                sum(
                    v
                    for k, v in w2.metrics().items()
                    if k.startswith("loraplane_worker_prefetch_bytes_total")
                )
                == 0
            )
            assert w2.metric("loraplane_worker_cache_hits_total") >= 20
        finally:
            w2.__exit__()


def test_sigkill_mid_download_then_restart(kube, namespace, tmp_path, env, hf_hub):
    base, root, ads, op = env
    # About 600 KB, served in 64 KiB chunks 0.3 s apart: a download of about 3 s to kill in the middle.
    src = adapters_mod.write_adapter(
        tmp_path / "hub-src", r=64, target_modules=adapters_mod.ATTN + adapters_mod.MLP
    )
    hf_hub.add_commit("org/slow", src)
    hf_hub.chunk_delay_s = 0.3
    ads.create(fleet.adapter_obj("slow", "hf://org/slow"))
    w = fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name="w1", namespace=namespace, base_dir=base, local_root=root,
        extra=["--hf-endpoint", hf_hub.url], env={"HF_HUB_DISABLE_TELEMETRY": "1"},
    )  # fmt: skip
    with w:
        fleet.wait_for(lambda: hf_hub.active > 0, 30, lambda: f"a download in flight\n{w.log()[-3000:]}")
        w.kill()
    entries = w.cache_dir / "entries"
    assert not any(entries.iterdir()), "a killed download must not leave an entry that looks complete"
    hf_hub.chunk_delay_s = 0.0
    with w:
        adapter_id = fleet.wait_for(lambda: ads.ids().get("slow"), 10, "an ID")
        fleet.wait_for(
            lambda: fleet.states(ads, "w1", namespace) == {adapter_id: "Ready"}, 40, lambda: w.log()[-3000:]
        )
        rep = fleet.report(ads, "w1", namespace)[adapter_id]
        assert rep["info"]["resolvedRevision"] == hf_hub.refs["org/slow"]["main"]
        assert len(list(entries.iterdir())) == 1
        assert not [p for p in (w.cache_dir / "tmp").iterdir() if not p.name.startswith("trash-")]
        assert w.stop() == 0
    # Restarted again with its cache: the revision is resolved at the Hub, but no file is downloaded.
    gets = len(hf_hub.file_gets())
    assert gets > 0
    with w:
        fleet.wait_for(
            lambda: fleet.states(ads, "w1", namespace) == {adapter_id: "Ready"}, 40, lambda: w.log()[-3000:]
        )
        assert len(hf_hub.file_gets()) == gets
        assert w.stop() == 0
    # And through a Hub outage: the resolution recorded with the cached copy serves it.
    w.args[w.args.index("--hf-endpoint") + 1] = servers.closed_url()
    with w:
        fleet.wait_for(
            lambda: fleet.states(ads, "w1", namespace) == {adapter_id: "Ready"}, 40, lambda: w.log()[-3000:]
        )
        assert "serving the cached copy of hf://org/slow" in w.log()
        assert w.stop() == 0


def test_sigterm_during_a_download_stops_promptly(kube, namespace, tmp_path, env, hf_hub):
    base, root, ads, op = env
    src = adapters_mod.write_adapter(
        tmp_path / "hub-src", r=64, target_modules=adapters_mod.ATTN + adapters_mod.MLP
    )
    hf_hub.add_commit("org/slower", src)
    hf_hub.chunk_delay_s = 2.0  # about 20 s for the whole file: far longer than the stop bound below
    ads.create(fleet.adapter_obj("slower", "hf://org/slower"))
    w = fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name="w1", namespace=namespace, base_dir=base, local_root=root,
        extra=["--hf-endpoint", hf_hub.url],
    )  # fmt: skip
    with w:
        fleet.wait_for(lambda: hf_hub.active > 0, 30, lambda: f"a download in flight\n{w.log()[-3000:]}")
        assert w.stop(timeout=10) == 0
    assert "abandoning 1 blocking call(s) in flight" in w.log()
    assert not any((w.cache_dir / "entries").iterdir())
