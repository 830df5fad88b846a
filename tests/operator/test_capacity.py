"""A worker that waits on capacity says so on the adapter, not only in its own LoRAWorker report: a real
operator and a real worker whose cache holds one adapter; the second one is Registered with Ready=False
reason CacheFull and a Warning Event, and becomes Ready when the first is deleted."""

from __future__ import annotations

from support import adapters as adapters_mod
from support import fleet


def _size(path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def test_cache_full_shows_on_the_adapter_and_in_an_event(kube, crds, namespace, tmp_path) -> None:
    base = adapters_mod.write_base_config(tmp_path / "base")
    root = tmp_path / "adapters"
    dirs = {n: adapters_mod.write_adapter(root / n, seed=i) for i, n in enumerate(["a1", "a2"])}
    budget = _size(dirs["a1"]) * 3 // 2  # room for one adapter, not two
    ads = fleet.Adapters(kube, namespace)
    op = fleet.OperatorProc(kube.kubeconfig, namespace, tmp_path / "operator.log")
    w = fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name="w1", namespace=namespace, base_dir=base, local_root=root,
        extra=["--cache-bytes", str(budget)],
    )  # fmt: skip
    with op, w:
        logs = lambda: f"{w.log()[-2000:]}\n{op.log()[-2000:]}"  # noqa: E731
        ads.create(fleet.adapter_obj("a1", str(dirs["a1"])))
        fleet.wait_for(lambda: (ads.get("a1").get("status") or {}).get("phase") == "Ready", 30, logs)
        ads.create(fleet.adapter_obj("a2", str(dirs["a2"])))

        def waiting() -> dict | None:
            st = ads.get("a2").get("status") or {}
            ready = {c["type"]: c for c in st.get("conditions") or []}.get("Ready") or {}
            return st if ready.get("reason") == "CacheFull" else None

        st = fleet.wait_for(waiting, 30, logs)
        assert st["phase"] == "Registered" and st["workers"] == {"ready": 0, "failed": 0, "total": 1}
        assert (
            f"worker {namespace}/w1: CacheFull:" in st["message"]
            and "raise the cache budget" in st["message"]
        )
        from kubernetes import client

        with kube.api_client() as api:
            found = fleet.wait_for(
                lambda: [
                    e
                    for e in client.CoreV1Api(api).list_namespaced_event(namespace).items
                    if e.involved_object.name == "a2" and e.reason == "CacheFull"
                ],
                10,
                "a CacheFull Event on a2",
            )
        assert found[0].type == "Warning" and "CacheFull" in found[0].message

        ads.delete("a1")  # Its cache entry is no longer pinned: a2 fits.
        fleet.wait_for(lambda: (ads.get("a2").get("status") or {}).get("phase") == "Ready", 60, logs)
    ads.close()
