"""End to end: only adapters whose files match spec.digest and carry a trusted signature reach the engine.

The real operator and a real worker serving a tiny Llama on CPU (trusting one public key), against
the API server fixture (or a real cluster with --kubeconfig). Six adapters: pinned right, pinned
wrong, signed, unsigned, signed then tampered, signed by an untrusted key. While they are prepared and then
requested by name, a thread reads the engine's own list of loaded adapters (GET /engine:
``adapterIds`` as the engine reports them) every 50 ms; no refused adapter's ID may ever appear there. Then a digest change alone
is a new version: a new ID, which fails, while the old one keeps serving.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import fleet, models, signing

from loraplane.worker import provenance

pytestmark = [pytest.mark.slow]

BASE = fleet.BASE_MODEL


def test_nothing_unverified_reaches_the_engine(kube, namespace: str, tmp_path: Path) -> None:
    kube.apply_crds()
    base = models.make_tiny_llama(tmp_path / "models" / BASE)
    root = tmp_path / "adapters"
    made = {n: models.make_peft_adapter(base, root / n, r=4, alpha=8, seed=i) for i, n in enumerate(
        ("pinned", "mispinned", "signed", "unsigned", "tampered", "foreign"))}  # fmt: skip
    team_key, team_pub = signing.key_pair(tmp_path / "keys", "team")
    other_key, _ = signing.key_pair(tmp_path / "keys", "other")
    for name in ("signed", "tampered"):
        signing.sign_with_key(made[name], team_key)
    signing.sign_with_key(made["foreign"], other_key)
    weights = made["tampered"] / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight, after signing
    weights.write_bytes(bytes(data))
    digest = {n: provenance.digest_of(provenance.file_digests(d)) for n, d in made.items()}

    def obj(name: str, **spec: Any) -> dict[str, Any]:
        o = fleet.adapter_obj(name, f"file://{made[name]}")
        o["spec"].update(spec)
        return o

    ads = fleet.Adapters(kube, namespace)
    worker = fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name="prov-worker", namespace=namespace, base_dir=base, local_root=root,
        extra=["--mode", "serve", "--device", "cpu", "--max-loras", "2",
               "--signature-public-keys", str(team_pub)],
    )  # fmt: skip
    seen: set[int] = set()
    samples: list[int] = []  # answers the engine gave
    stop = threading.Event()

    def watch_engine() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{worker.port}", timeout=2, trust_env=False) as http:
            while not stop.is_set():
                try:
                    seen.update(http.get("/engine").raise_for_status().json()["adapterIds"])
                    samples.append(1)
                except (httpx.HTTPError, ValueError, KeyError):
                    pass  # not serving yet
                stop.wait(0.05)

    sampler = threading.Thread(target=watch_engine, daemon=True)
    with fleet.OperatorProc(kube.kubeconfig, namespace, tmp_path / "operator.log") as op, worker:
        sampler.start()
        ads.create(obj("pinned", digest=digest["pinned"]))
        ads.create(obj("mispinned", digest=digest["pinned"]))  # someone else's files
        signed = {"signature": {"required": True}}
        for name in ("signed", "unsigned", "tampered", "foreign"):
            ads.create(obj(name, **signed))
        want = {
            "pinned": "Ready",
            "signed": "Ready",
            "mispinned": provenance.DIGEST_MISMATCH,
            "unsigned": provenance.SIGNATURE_MISSING,
            "tampered": provenance.SIGNATURE_INVALID,
            "foreign": provenance.UNTRUSTED_SIGNER,
        }

        def outcome() -> dict[str, str | None]:
            ids = ads.ids()
            report = fleet.report(ads, "prov-worker", namespace)
            out: dict[str, str | None] = {}
            for name, i in ids.items():
                r = report.get(i) if i else None
                out[name] = None if r is None else ("Ready" if r["state"] == "Ready" else r.get("reason"))
            return out

        fleet.wait_for(
            lambda: outcome() == want, 120, lambda: f"{outcome()}\n{worker.log()[-3000:]}\n{op.log()[-1500:]}"
        )
        ids = ads.ids()
        fleet.wait_for(
            lambda: ads.get("pinned").get("status", {}).get("phase") == "Ready", 30, "pinned Ready"
        )
        status = {n: ads.get(n)["status"] for n in want}
        assert status["pinned"]["adapter"]["digest"] == digest["pinned"]  # copyable into spec.digest
        assert status["signed"]["adapter"]["signer"] == "key team.pub"
        report = fleet.report(ads, "prov-worker", namespace)
        mismatch = report[ids["mispinned"]]["message"]
        assert digest["pinned"] in mismatch and digest["mispinned"] in mismatch, mismatch
        assert "adapter_model.safetensors differs" in report[ids["tampered"]]["message"]

        # Ask for every adapter: the verified ones answer, the refused ones get their reason. The builtin
        # engine loads an adapter into a device slot at its first request; it held only what was verified,
        # at every sample. The refused files left the cache.
        from openai import APIStatusError, OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{worker.port}/v1", api_key="unused", max_retries=0)
        for name, outcome_want in want.items():
            if outcome_want == "Ready":
                assert client.completions.create(model=name, prompt=[5, 17], max_tokens=2).choices
                continue
            with pytest.raises(APIStatusError) as refused:
                client.completions.create(model=name, prompt=[5, 17], max_tokens=2)
            error = refused.value.body if isinstance(refused.value.body, dict) else {}
            assert error.get("type") == outcome_want, refused.value.body
        served = {ids["pinned"], ids["signed"]}
        fleet.wait_for(
            lambda: seen == served, 10, lambda: f"engine held {seen}, ids {ids}, {len(samples)} samples"
        )
        entries = list((worker.cache_dir / "entries").iterdir())
        assert len(entries) == 2, entries

        # spec.digest alone changed (same path): a new version with a new ID; it fails, the old one serves.
        ads.patch_spec("pinned", {"digest": digest["signed"]})
        new_id = fleet.wait_for(
            lambda: (
                (ads.get("pinned").get("status") or {}).get("id") not in (None, ids["pinned"])
                and ads.get("pinned")["status"]["id"]
            ),
            60,
            lambda: op.log()[-2000:],
        )
        fleet.wait_for(
            lambda: (
                fleet.report(ads, "prov-worker", namespace).get(new_id, {}).get("reason")
                == provenance.DIGEST_MISMATCH
            ),
            60,
            lambda: worker.log()[-3000:],
        )
        engine = httpx.get(f"http://127.0.0.1:{worker.port}/engine", timeout=5, trust_env=False).json()
        assert ids["pinned"] in engine["adapterIds"] and new_id not in engine["adapterIds"], engine
        stop.set()
        sampler.join(5)
        assert new_id not in seen and seen <= served | {ids["pinned"]}, seen
        ads.close()
