"""A worker whose cache volume is really full (issue 18 §5), against the API server fixture.

The worker process runs in its own mount namespace (``unshare -rm``) with its cache directory on a
2.5 MiB tmpfs, while its byte budget says 256 MiB (a volume smaller than the budget, or shared with
something else): every write past 2.5 MiB fails with ENOSPC from the kernel, as on a full
PersistentVolume. Each adapter is 1 MiB of real LoRA weights (rank 128). IDs are written by the test
in the operator's place. Skipped where user namespaces are not allowed (then nothing can mount).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import adapters as adapters_mod
from support import fleet

pytestmark = [pytest.mark.slow]

VOLUME = "2560k"
ALL = adapters_mod.ATTN + adapters_mod.MLP  # rank 128 on every linear of 2 layers: 1 MiB


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        timeout=10,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="no user namespaces here: cannot mount a small tmpfs")
def test_a_full_volume_evicts_what_is_not_served_and_delete_frees_at_once(
    kube: Any, namespace: str, tmp_path: Path
) -> None:
    kube.apply_crds()
    base = adapters_mod.write_base_config(tmp_path / "base")
    root = tmp_path / "adapters"
    paths = {
        n: adapters_mod.write_adapter(root / n, r=128, target_modules=ALL, seed=i)
        for i, n in enumerate(("v1", "v2", "b", "c", "d"))
    }
    ads = fleet.Adapters(kube, namespace)
    w = fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name="full", namespace=namespace, base_dir=base, local_root=root,
        extra=["--max-lora-rank", "128"],
    )  # fmt: skip
    w.cache_dir.mkdir(parents=True)
    mount = f'mount -t tmpfs -o size={VOLUME} tmpfs "$0" && exec "$@"'
    w.args = ["unshare", "-rm", "sh", "-c", mount, str(w.cache_dir), *w.args]

    def state(i: int) -> dict[str, Any]:
        return fleet.report(ads, "full", namespace).get(i, {})

    def wait_state(i: int, want: str, timeout: float = 60) -> dict[str, Any]:
        return fleet.wait_for(
            lambda: (s := state(i)).get("state") == want and s,
            timeout,
            lambda: f"id {i} {want}\n{w.log()[-3000:]}",
        )

    try:
        with w:
            ads.create(fleet.adapter_obj("a", str(paths["v1"])))
            ads.assign("a", 1)
            wait_state(1, "Ready")
            ads.patch_spec("a", {"path": str(paths["v2"])})  # a new version: v1 stays cached, unserved
            ads.assign("a", 2)
            wait_state(2, "Ready")
            fleet.wait_for(lambda: 1 not in fleet.report(ads, "full", namespace), 30, "v1 retired")
            assert w.metric("loraplane_worker_cache_entries") == 2

            # 1 MiB more does not fit in the 0.5 MiB left: v1's entry, served by no one, makes room.
            ads.create(fleet.adapter_obj("b", str(paths["b"])))
            ads.assign("b", 3)
            wait_state(3, "Ready")
            assert w.metric("loraplane_worker_cache_evictions_total") >= 1
            assert "cache volume" in w.log() and "full" in w.log()

            # Deleting an adapter frees its bytes at once, and the next one fits without evicting.
            held = w.metric("loraplane_worker_cache_bytes")
            ads.delete("b")
            fleet.wait_for(
                lambda: w.metric("loraplane_worker_cache_bytes") < held - (1 << 20) + 4096,
                15,
                lambda: f"b's entry removed\n{w.log()[-2000:]}",
            )
            evictions = w.metric("loraplane_worker_cache_evictions_total")
            ads.create(fleet.adapter_obj("c", str(paths["c"])))
            ads.assign("c", 4)
            wait_state(4, "Ready")
            assert w.metric("loraplane_worker_cache_evictions_total") == evictions

            # Full of served adapters: nothing to evict, so CacheFull naming the volume (and retried).
            ads.create(fleet.adapter_obj("d", str(paths["d"])))
            ads.assign("d", 5)
            d = fleet.wait_for(
                lambda: (s := state(5)).get("reason") == "CacheFull" and s,
                60,
                lambda: f"d CacheFull\n{w.log()[-3000:]}",
            )
            assert d["state"] == "Prefetching" and "volume" in d["message"] and "full" in d["message"], d
            assert state(2)["state"] == "Ready" and state(4)["state"] == "Ready"  # served ones untouched
            ads.delete("c")  # a served adapter leaves: d gets its room on its next try
            wait_state(5, "Ready", timeout=90)
    finally:
        ads.close()
