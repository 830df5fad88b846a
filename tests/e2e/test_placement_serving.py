"""End to end for placement: a serving worker holds only the adapters placed on it, and a request for one
placed on another worker gets a 404 naming that worker (the official openai client); `kubectl get lora`
shows READY as ready/desired.

The other worker is a LoRAWorker written by hand (live: its heartbeat is an hour ahead), so the test
needs one model process only; the operator places each adapter (replicas 1) on one of the two.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from support import fleet, models

pytestmark = [pytest.mark.kubectl, pytest.mark.slow, pytest.mark.timeout(600)]

BASE = fleet.BASE_MODEL
NAMES = [f"p{i}" for i in range(6)]


def test_requests_for_adapters_placed_elsewhere_get_a_404_naming_the_holder(
    kube, namespace: str, tmp_path: Path
) -> None:
    import openai
    from kubernetes import client

    base = models.make_tiny_llama(tmp_path / "models" / BASE)
    root = tmp_path / "adapters"
    local = models.make_peft_adapter(base, root / "one", r=4, alpha=8, seed=5, init_scale=0.3)
    kube.apply_crds()
    ads = fleet.Adapters(kube, namespace)
    with kube.api_client() as api:
        co = client.CustomObjectsApi(api)
        ghost = {
            "apiVersion": "loraplane.io/v1alpha1", "kind": "LoRAWorker", "metadata": {"name": "ghost"},
            "spec": {"baseModel": BASE, "capacity": {"maxLoras": 2, "maxLoraRank": 16, "maxCpuLoras": 4,
                                                     "cacheBytes": 1 << 30}},
        }  # fmt: skip
        co.create_namespaced_custom_object("loraplane.io", "v1alpha1", namespace, "loraworkers", ghost)
        ahead = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        co.patch_namespaced_custom_object_status(
            "loraplane.io",
            "v1alpha1",
            namespace,
            "loraworkers",
            "ghost",
            {"status": {"heartbeatTime": ahead}},
        )
    worker = fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name="real", namespace=namespace, base_dir=base, local_root=root,
        extra=["--mode", "serve", "--device", "cpu", "--max-loras", "2"],
    )  # fmt: skip
    with fleet.OperatorProc(kube.kubeconfig, namespace, tmp_path / "operator.log") as op, worker:
        logs = lambda: f"{worker.log()[-3000:]}\n{op.log()[-2000:]}"  # noqa: E731
        fleet.wait_for(lambda: _live(kube, namespace), 300, logs)
        for name in NAMES:
            obj = fleet.adapter_obj(name, f"file://{local}")
            obj["spec"]["replicas"] = 1
            ads.create(obj)

        def placed() -> dict[str, str] | None:
            out = {}
            for name in NAMES:
                workers = ((ads.get(name).get("status") or {}).get("placement") or {}).get("workers") or []
                if len(workers) != 1:
                    return None
                out[name] = workers[0].split("/")[1]
            return out

        where = fleet.wait_for(placed, 60, logs)
        here = [n for n, w in where.items() if w == "real"]
        there = [n for n, w in where.items() if w == "ghost"]
        assert here and there, f"six adapters should land on both workers: {where}"
        kube.kubectl("wait", "--for=condition=Ready", *[f"lora/{n}" for n in here], "-n", namespace,
                     "--timeout=300s")  # fmt: skip
        table = kube.kubectl("get", "lora", "-n", namespace).stdout.splitlines()
        assert " READY " in table[0], table[0]
        ready = {line.split()[0]: line.split()[5] for line in table[1:]}
        assert all(ready[n] == "1/1" for n in here) and all(ready[n] == "0/1" for n in there), table

        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{worker.port}/v1", api_key="unused", max_retries=0)
        listed = {m.id for m in oa.models.list().data}
        assert set(here) <= listed and not set(there) & listed, listed
        out = oa.completions.create(model=here[0], prompt=[5, 17, 42], max_tokens=4, temperature=0)
        assert out.choices[0].text is not None
        with pytest.raises(openai.NotFoundError) as err:
            oa.completions.create(model=there[0], prompt=[5, 17, 42], max_tokens=4)
        body = err.value.body
        body = body.get("error", body) if isinstance(body, dict) else body
        assert body["code"] == "model_not_found" and body["type"] == "AdapterNotPlacedHere", body
        assert f"{namespace}/ghost" in body["message"] and "gateway" in body["message"], body
    ads.close()


def _live(kube, namespace: str) -> bool:
    from kubernetes import client

    with kube.api_client() as api:
        obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
            "loraplane.io", "v1alpha1", namespace, "loraworkers", "real"
        ) if _exists(api, namespace) else None  # fmt: skip
    return bool(obj and (obj.get("status") or {}).get("heartbeatTime"))


def _exists(api, namespace: str) -> bool:
    from kubernetes import client

    items = client.CustomObjectsApi(api).list_namespaced_custom_object(
        "loraplane.io", "v1alpha1", namespace, "loraworkers"
    )["items"]
    return any(i["metadata"]["name"] == "real" for i in items)
