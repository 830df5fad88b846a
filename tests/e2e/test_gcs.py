"""End to end for gs:// (a kind added as a source plug-in): kubectl apply -> operator ID -> the worker
resolves and prefetches from Cloud Storage (gcp-storage-emulator, the real google-cloud-storage client)
-> Ready -> served through the official openai client.

The same weights are also registered from a local directory: the gs:// adapter must answer exactly as
that one does, and differently from the base model, so the bytes served are the bytes uploaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import fleet, models, servers

pytestmark = [pytest.mark.kubectl, pytest.mark.slow, pytest.mark.timeout(600)]

gcs = servers.gcs
BASE = fleet.BASE_MODEL
PROMPT = [5, 17, 42, 9]


def test_a_gs_adapter_is_applied_ready_and_served(kube, namespace: str, tmp_path: Path, gcs: Any) -> None:
    from openai import OpenAI

    base = models.make_tiny_llama(tmp_path / "models" / BASE)
    local = models.make_peft_adapter(
        base, tmp_path / "adapters" / "sql", r=4, alpha=8, seed=5, init_scale=0.3
    )
    bucket = gcs.bucket()
    gcs.put_dir(bucket, "team-a/sql", local)
    kube.apply_crds()
    ads = fleet.Adapters(kube, namespace)
    worker = fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name="gcs-worker", namespace=namespace, base_dir=base,
        local_root=tmp_path / "adapters",
        extra=["--mode", "serve", "--device", "cpu", "--max-loras", "2",
               "--gs-endpoint", gcs.endpoint_url, "--gs-credentials", "anonymous"],
    )  # fmt: skip
    docs = [
        {"apiVersion": "loraplane.io/v1alpha1", "kind": "LoRAAdapter",
         "metadata": {"name": name, "namespace": namespace}, "spec": {"baseModel": BASE, "path": path}}
        for name, path in (("from-gcs", f"gs://{bucket}/team-a/sql"), ("from-disk", f"file://{local}"))
    ]  # fmt: skip
    with fleet.OperatorProc(kube.kubeconfig, namespace, tmp_path / "operator.log") as op, worker:
        kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        try:
            # The worker loads the base model before anything is Ready: minutes on a loaded CI machine.
            kube.kubectl("wait", "--for=condition=Ready", "lora", "--all", "-n", namespace, "--timeout=300s")
        except Exception:
            raise AssertionError(f"not Ready:\n{worker.log()[-3000:]}\n{op.log()[-2000:]}") from None
        row = next(line.split() for line in kube.kubectl("get", "lora", "-n", namespace).stdout.splitlines()
                   if line.startswith("from-gcs "))  # fmt: skip
        assert row[1:5] == ["from-gcs", BASE, str(ads.ids()["from-gcs"]), "Ready"], row
        info = ads.get("from-gcs")["status"]["adapter"]
        weights = (local / "adapter_model.safetensors").read_bytes()
        assert info["sha256"] == hashlib.sha256(weights).hexdigest() and info["resolvedRevision"]

        client = OpenAI(base_url=f"http://127.0.0.1:{worker.port}/v1", api_key="unused", max_retries=0)

        def complete(model: str) -> str:
            out = client.completions.create(
                model=model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
            )
            return out.choices[0].text

        served = complete("from-gcs")
        assert served == complete("from-disk"), "the gs:// copy serves other weights than the local one"
        assert served != complete(BASE), "the adapter must change the output visibly"
        metrics = worker.metrics()
        assert metrics.get('loraplane_worker_requests_total{model="from-gcs",status="200"}', 0) >= 1, metrics
    ads.close()
