"""End to end: kubectl apply -> operator IDs -> worker prefetch/validate/load -> OpenAI completions.

The API server fixture (the local server, or a real cluster with --kubeconfig), the real operator and
a real worker process serving a tiny Llama checkpoint on CPU; completions come through the official
openai client and are checked token for token against PEFT's greedy generation for each adapter.
Then a path change: a new ID, requests in flight finish on the old weights, new requests get the
new ones, and no request fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from support import fleet, models
from support.swap import swap_under_streaming

pytestmark = [pytest.mark.kubectl, pytest.mark.slow]


BASE = fleet.BASE_MODEL
PROMPT = [5, 17, 42, 9]  # token IDs: no tokenizer round trip between us and the reference
ADAPTERS = {  # name -> PEFT adapter shape; different ranks, one rsLoRA
    "alpha": dict(r=4, alpha=8, seed=1, init_scale=0.3),
    "beta": dict(r=8, alpha=16, seed=2, init_scale=0.3, use_rslora=True),
    "gamma": dict(r=16, alpha=16, seed=3, init_scale=0.3, target_modules=["q_proj", "v_proj", "down_proj"]),
}
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("e2e")
    base = models.make_tiny_llama(root / "models" / BASE)
    adapters = {n: models.make_peft_adapter(base, root / "adapters" / n, **kw) for n, kw in ADAPTERS.items()}
    return base, root / "adapters", adapters


def peft_greedy(base: Path, adapter: Path | None, max_tokens: int) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        with models.quiet_peft():
            model = PeftModel.from_pretrained(model, str(adapter))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(PROMPT) :].tolist()


def manifest(namespace: str, name: str, path: Path) -> dict[str, Any]:
    return {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"baseModel": BASE, "path": f"file://{path}"},
    }


def test_apply_serve_and_swap(kube, namespace: str, tmp_path: Path, weights) -> None:
    from openai import OpenAI

    base, root, adapters = weights
    kube.apply_crds()
    tokenizer_decode = _decoder(base)
    expected = {n: tokenizer_decode(peft_greedy(base, p, MAX_TOKENS)) for n, p in adapters.items()}
    expected[BASE] = tokenizer_decode(peft_greedy(base, None, MAX_TOKENS))
    assert len(set(expected.values())) == len(expected), "the adapters must change the output visibly"

    ads = fleet.Adapters(kube, namespace)
    worker = fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name="e2e-worker", namespace=namespace, base_dir=base, local_root=root,
        extra=["--mode", "serve", "--device", "cpu", "--max-loras", "2"],
    )  # fmt: skip
    with fleet.OperatorProc(kube.kubeconfig, namespace, tmp_path / "operator.log") as op, worker:
        docs = [manifest(namespace, n, p) for n, p in adapters.items()]
        kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        kube.kubectl("wait", "--for=condition=Ready", "lora", "--all", "-n", namespace, "--timeout=120s")
        table = kube.kubectl("get", "lora", "-n", namespace).stdout
        ids = ads.ids()
        for name in adapters:
            row = next(line.split() for line in table.splitlines() if line.startswith(name + " "))
            assert row[1:5] == [name, BASE, str(ids[name]), "Ready"], table
        assert len(set(ids.values())) == len(ids) and all(i > 0 for i in ids.values())

        client = OpenAI(base_url=f"http://127.0.0.1:{worker.port}/v1", api_key="unused", max_retries=0)
        listed = {m.id: (m.model_extra or {}).get("loraplane") or {} for m in client.models.list().data}
        assert {n: listed[n].get("id") for n in adapters} == ids, listed
        assert BASE in listed

        def complete(model: str, max_tokens: int = MAX_TOKENS) -> str:
            out = client.completions.create(
                model=model,
                prompt=PROMPT,
                max_tokens=max_tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            return out.choices[0].text

        for model, text in expected.items():
            assert complete(model) == text, f"{model}: served output differs from PEFT's greedy output"

        # A new version of 'alpha' (its path now points at beta's weights) while clients keep
        # streaming: a new ID, requests in flight finish on the old weights, no request fails.
        long_tokens = 200
        swap = swap_under_streaming(
            client, kube, ads, name="alpha", new_path=adapters["beta"], prompt=PROMPT,
            max_tokens=long_tokens, wait_s=60, diagnose=lambda: op.log()[-2000:],
        )  # fmt: skip
        assert swap.new_id > max(ids.values()), "a new version gets a new, never used ID"
        # status.previousId lives only until the workers switch; the Event keeps the record.
        events = kube.kubectl(
            "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=alpha"
        ).stdout
        assert f"assigned ID {swap.new_id} " in events and f"replacing ID {ids['alpha']}" in events, events
        swap.check(
            tokenizer_decode(peft_greedy(base, adapters["alpha"], long_tokens)),
            tokenizer_decode(peft_greedy(base, adapters["beta"], long_tokens)),
        )
        metrics = worker.metrics()  # one /metrics for the control path and the engine
        names = sorted(metrics)
        assert any(k.startswith("loraplane_worker_prefetch_bytes_total") for k in names), names
        assert metrics.get('loraplane_worker_requests_total{model="alpha",status="200"}', 0) > 2, names
        kube.kubectl("wait", "--for=condition=Ready", "lora/alpha", "-n", namespace, "--timeout=60s")
        ads.close()


def _decoder(base: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    return lambda ids: tok.decode(ids, skip_special_tokens=True)  # as the server detokenizes
