"""What a Gateway API Inference Extension deployment reads, from a real operator and real workers.

Two serving workers (built-in engine, CPU) of two different base models and an operator with body-based
routing on run against the API server fixture. Then, as adapters are added, used, deleted, swapped to a
new version and renamed:
- the BBR ConfigMaps map every served name to its base model (what BBR reads to pick the pool);
- each worker's /metrics lists, in vLLM's residency series, exactly the adapters it holds and where
  (what the endpoint picker reads to pick the pod), and nothing it does not hold.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import fleet, models

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BASE = fleet.BASE_MODEL
OTHER = "other-org/tiny-chat"
BBR = "inference.networking.k8s.io/bbr-managed=true"


def residency(port: int) -> tuple[dict[str, str], tuple[float, float, float]]:
    """vllm:lora_adapter_loaded as served name -> level, and (gpu count, cpu count, gpu slots)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    levels = {s.labels["adapter_name"]: s.labels["level"] for s in fams["vllm:lora_adapter_loaded"].samples}
    counts = tuple(
        fams[f"vllm:{n}"].samples[0].value
        for n in ("num_gpu_loaded_lora_adapters", "num_cpu_loaded_lora_adapters", "max_gpu_lora_adapters")
    )
    return levels, counts  # type: ignore[return-value]


def bbr_map(core: Any, ns: str) -> dict[str, str]:
    out = {}
    for cm in core.list_namespaced_config_map(ns, label_selector=BBR).items:
        for name in yaml.safe_load(cm.data.get("adapters") or "[]") or []:
            out[name] = cm.data["baseModel"]
        out.setdefault(f"<base {cm.data['baseModel']}>", cm.data["baseModel"])
    return out


def test_bbr_configmaps_and_picker_series_follow_the_fleet(kube, namespace: str, tmp_path: Path) -> None:
    from kubernetes import client

    bases = {
        BASE: models.make_tiny_llama(tmp_path / "m1"),
        OTHER: models.make_tiny_llama(tmp_path / "m2", seed=7),
    }
    root = tmp_path / "adapters"
    paths = {
        "a1": models.make_peft_adapter(bases[BASE], root / "a1", r=4, alpha=8, seed=1),
        "a2": models.make_peft_adapter(bases[BASE], root / "a2", r=4, alpha=8, seed=2),
        "a2-v2": models.make_peft_adapter(bases[BASE], root / "a2-v2", r=4, alpha=8, seed=3),
        "b1": models.make_peft_adapter(bases[OTHER], root / "b1", r=4, alpha=8, seed=4),
    }
    kube.apply_crds()
    workers = {
        base: fleet.WorkerProc(
            kube.kubeconfig,
            tmp_path,
            name=f"w-{i}",
            namespace=namespace,
            base_dir=path,
            local_root=root,
            served_model=base,
            extra=["--mode", "serve", "--device", "cpu", "--max-loras", "1", "--max-cpu-loras", "2"],
        )  # fmt: skip
        for i, (base, path) in enumerate(bases.items())
    }
    op = fleet.OperatorProc(
        kube.kubeconfig,
        namespace,
        tmp_path / "operator.log",
        args=["--bbr-namespace", namespace, "--bbr-window", "0.2"],
    )
    ads = fleet.Adapters(kube, namespace)
    core = client.CoreV1Api(ads._api_client)
    wa, wb = workers[BASE], workers[OTHER]

    def logs() -> str:
        return f"operator:\n{op.log()[-2000:]}\n" + "".join(
            f"{w.name}:\n{w.log()[-2000:]}\n" for w in (wa, wb)
        )

    def ready(*names: str) -> None:
        fleet.wait_for(
            lambda: all((ads.get(n).get("status") or {}).get("phase") == "Ready" for n in names), 120, logs
        )

    def use(worker: fleet.WorkerProc, model: str) -> None:
        body = {"model": model, "prompt": [5, 17, 42], "max_tokens": 2}
        r = httpx.post(f"http://127.0.0.1:{worker.port}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text

    def holds(worker: fleet.WorkerProc, levels: dict[str, str], gpu: float, cpu: float) -> None:
        fleet.wait_for(
            lambda: residency(worker.port) == (levels, (gpu, cpu, 1.0)),
            30,
            lambda: f"{worker.name}: {residency(worker.port)} != {(levels, (gpu, cpu, 1.0))}",
        )

    with op, wa, wb:
        for name in ("a1", "a2"):
            ads.create(fleet.adapter_obj(name, f"file://{paths[name]}"))
        ads.create(fleet.adapter_obj("b1", f"file://{paths['b1']}", base_model=OTHER))
        ready("a1", "a2", "b1")
        routes = {"a1": BASE, "a2": BASE, "b1": OTHER, f"<base {BASE}>": BASE, f"<base {OTHER}>": OTHER}
        fleet.wait_for(lambda: bbr_map(core, namespace) == routes, 30, lambda: str(bbr_map(core, namespace)))
        # Registered and on disk, but in neither cache: the picker sees no adapter yet.
        holds(wa, {}, 0, 0)
        holds(wb, {}, 0, 0)

        use(wa, "a1")
        holds(wa, {"a1": "gpu"}, 1, 1)
        use(wa, "a2")  # one slot: a2 takes it, a1 stays in the host cache
        holds(wa, {"a1": "cpu", "a2": "gpu"}, 1, 2)
        use(wb, "b1")
        holds(wb, {"b1": "gpu"}, 1, 1)
        holds(wa, {"a1": "cpu", "a2": "gpu"}, 1, 2)  # each worker lists only its own

        # Delete: gone from the worker's series and from BBR's map.
        ads.delete("a1")
        holds(wa, {"a2": "gpu"}, 1, 1)
        del routes["a1"]
        fleet.wait_for(lambda: bbr_map(core, namespace) == routes, 30, lambda: str(bbr_map(core, namespace)))

        # Swap a2 to new weights (a new ID): the old version leaves the caches, the new one is not
        # loaded until a request uses it; the name routes as before.
        old_id = ads.ids()["a2"]
        ads.patch_spec("a2", {"path": f"file://{paths['a2-v2']}"})
        fleet.wait_for(lambda: ads.ids()["a2"] != old_id, 30, logs)
        ready("a2")
        holds(wa, {}, 0, 0)
        use(wa, "a2")
        holds(wa, {"a2": "gpu"}, 1, 1)
        assert bbr_map(core, namespace) == routes

        # Rename b1: BBR maps the new name, the worker serves and lists it under that name.
        ads.patch_spec("b1", {"name": "b1-chat"})
        del routes["b1"]
        routes["b1-chat"] = OTHER
        fleet.wait_for(lambda: bbr_map(core, namespace) == routes, 30, lambda: str(bbr_map(core, namespace)))
        fleet.wait_for(
            lambda: "b1-chat" in json.dumps(httpx.get(f"http://127.0.0.1:{wb.port}/v1/models").json()),
            30,
            logs,
        )
        use(wb, "b1-chat")
        holds(wb, {"b1-chat": "gpu"}, 1, 1)
    ads.close()
