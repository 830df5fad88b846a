"""The worker process end to end on its control path: watch -> prefetch -> validate -> Ready, reported
in its own LoRAWorker; bad configuration stops it at start; SIGTERM stops it cleanly.

Workers run as real subprocesses against the API server fixture. IDs are written by the test in
the operator's place (status.id + NameAvailable), so these tests do not depend on the operator.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from support import adapters as adapters_mod
from support import fleet


@pytest.fixture
def setup(kube, namespace, tmp_path):
    kube.apply_crds()
    base = adapters_mod.write_base_config(tmp_path / "base")
    root = tmp_path / "adapters"
    root.mkdir()
    ads = fleet.Adapters(kube, namespace)
    yield base, root, ads
    ads.close()


def _worker(kube, tmp_path, namespace, base, root, name="w1", **kw):
    return fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name=name, namespace=namespace, base_dir=base, local_root=root, **kw
    )


def test_adapters_become_ready_failed_or_ignored_and_are_reported(kube, namespace, tmp_path, setup):
    base, root, ads = setup
    good = adapters_mod.write_adapter(root / "good", r=8)
    small = adapters_mod.write_adapter(
        root / "small", r=4, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    big = adapters_mod.write_adapter(root / "big", r=128)
    other = adapters_mod.write_adapter(root / "other")
    with _worker(kube, tmp_path, namespace, base, root, extra=["--max-lora-rank", "64"]) as w:
        ads.create(fleet.adapter_obj("good", str(good)))
        ads.create(fleet.adapter_obj("small", f"file://{small}", served_name="small-one"))
        ads.create(fleet.adapter_obj("big", str(big)))
        ads.create(fleet.adapter_obj("other-base", str(other), base_model="another-model"))
        ads.create(fleet.adapter_obj("no-id", str(other)))
        ads.create(fleet.adapter_obj("taken", str(other), served_name="good"))
        ads.assign("good", 11)
        ads.assign("small", 12)
        ads.assign("big", 13)
        ads.assign("other-base", 14)
        ads.assign("taken", 15, name_available=False)
        want = {11: "Ready", 12: "Ready", 13: "Failed"}
        fleet.wait_for(
            lambda: fleet.states(ads, "w1", namespace) == want,
            30,
            lambda: f"states {want}\n{w.log()[-3000:]}",
        )
        rep = fleet.report(ads, "w1", namespace)
        assert rep[13]["reason"] == "RankTooLarge"
        assert "128" in rep[13]["message"] and "64" in rep[13]["message"]
        assert rep[11]["adapter"] == f"{namespace}/good"
        info = rep[12]["info"]
        assert info["rank"] == 4 and info["alpha"] == 16
        assert sorted(info["targetModules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
        assert len(info["sha256"]) == 64 and info["sizeBytes"] > 0 and info["resolvedRevision"]
        obj = next(o for o in ads.workers() if o["metadata"]["name"] == "w1")
        assert obj["spec"]["baseModel"] == fleet.BASE_MODEL
        assert obj["spec"]["capacity"]["maxLoraRank"] == 64
        assert obj["status"]["ready"] == 2 and obj["status"]["failed"] == 1
        assert obj["status"]["heartbeatTime"]
        assert w.metric('loraplane_worker_adapters{state="Ready"}') == 2
        assert w.metric('loraplane_worker_adapters{state="Failed"}') == 1
        assert w.metric('loraplane_worker_adapter_failures_total{reason="RankTooLarge"}') == 1
        assert w.metric('loraplane_worker_validation_failures_total{reason="RankTooLarge"}') == 1

        # Delete and name loss drop the adapter; the others stay.
        ads.delete("good")
        ads.assign("small", 12, name_available=False)
        fleet.wait_for(lambda: fleet.states(ads, "w1", namespace) == {13: "Failed"}, 20, "drops")
        assert w.stop() == 0
    # A clean stop removes the worker's report so the operator stops counting it at once.
    assert all(o["metadata"]["name"] != "w1" for o in ads.workers())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-lora-rank", "-1"], "--max-lora-rank must be a positive integer, got -1"),
        (["--max-loras", "x"], "--max-loras must be a whole number, optionally a Kubernetes quantity"),
        (["--cache-bytes", "1.5"], "--cache-bytes must be a whole number"),
        (["--log-format", "xml"], "--log-format must be text or json, got 'xml'"),
        (["--access-log", "maybe"], "--access-log must be on or off, got 'maybe'"),
        (["--base-model", "/nonexistent/dir"], "--base-model /nonexistent/dir: no such directory"),
        (["--base-model", "{tmp}"], "no config.json in that directory"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'"),
        (
            ["--max-cpu-loras", "2", "--max-loras", "4"],
            "--max-cpu-loras (2) must be at least --max-loras (4)",
        ),
        (["--local-roots", "relative/dir"], "--local-roots 'relative/dir' must be an absolute directory"),
        (["--namespaces", "Bad_NS"], "--namespaces 'Bad_NS' is not a valid namespace name"),
        (["--s3-endpoint", "localhost:9000"], "--s3-endpoint must be an http:// or https:// URL"),
        (["--heartbeat-seconds", "0"], "--heartbeat-seconds must be a positive number of seconds"),
        (["--api-keys", "short"], "--api-keys: an API key must be 8 to 512 printable ASCII characters"),
        (
            ["--api-key-file", "/nonexistent/keys"],
            "--api-key-file /nonexistent/keys: No such file or directory",
        ),
        (["--drain-seconds", "-1"], "--drain-seconds must be zero or a positive number of seconds"),
        (["--public-paths", "health"], "--public-paths 'health' must be a path starting with /"),
        (["--require-signatures", "yes please"], "--require-signatures must be on or off"),
        (["--require-signatures", "on"], "--require-signatures on needs trust material"),
        (
            ["--signature-public-keys", "/nonexistent/team.pub"],
            "--signature-public-keys /nonexistent/team.pub: no such file",
        ),
        (
            ["--signature-identity", "ci@example.com"],
            "--signature-identity and --signature-oidc-issuer go together",
        ),
        (
            ["--kubeconfig", "/nonexistent/kubeconfig"],
            "--kubeconfig: cannot load Kubernetes credentials from /nonexistent",
        ),
    ],
)
def test_bad_configuration_stops_at_start_naming_the_flag(tmp_path, args, message):
    base = adapters_mod.write_base_config(tmp_path / "base")
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["--base-model", str(base), *[a.replace("{tmp}", str(empty)) for a in args]]
    proc = subprocess.run(
        [sys.executable, "-m", "loraplane.worker.main", *argv], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_settings_precedence_flags_over_env_over_file(tmp_path):
    from loraplane.worker import settings

    base = adapters_mod.write_base_config(tmp_path / "base")
    cfg = tmp_path / "worker.yaml"
    cfg.write_text(
        f"baseModel: {base}\nmaxLoraRank: 16\nmax-loras: 3\ncache_bytes: 1Gi\nnamespaces: [a, b]\n"
    )
    env = {
        "LORAPLANE_MAX_LORA_RANK": "32",
        "LORAPLANE_MAX_LORAS": "5",
        "POD_NAME": "w-0",
        "POD_NAMESPACE": "ns",
    }
    s = settings.load(["--config", str(cfg), "--max-loras", "7"], env)
    assert (s.engine.max_loras, s.engine.max_lora_rank, s.cache.cache_bytes) == (7, 32, 1 << 30)
    assert s.namespaces == ("a", "b")
    assert (s.object_name, s.report.object_namespace) == ("w-0", "ns")
    assert s.served_model_name == "base"  # the directory's name by default
    cfg.write_text("maxLoraRnak: 3\n")
    with pytest.raises(settings.ConfigError, match="unknown setting 'maxLoraRnak'"):
        settings.load(["--config", str(cfg), "--base-model", str(base)], {})


def test_new_version_keeps_the_old_one_until_ready(kube, namespace, tmp_path, setup):
    base, root, ads = setup
    v1 = adapters_mod.write_adapter(root / "v1", seed=1)
    bad = adapters_mod.write_adapter(root / "bad", target_modules=("q_proj", "nonexistent_proj"))
    v3 = adapters_mod.write_adapter(root / "v3", seed=3)
    with _worker(kube, tmp_path, namespace, base, root) as w:
        ads.create(fleet.adapter_obj("sql", str(v1)))
        ads.assign("sql", 2)
        fleet.wait_for(
            lambda: fleet.states(ads, "w1", namespace) == {2: "Ready"}, 30, lambda: w.log()[-3000:]
        )
        # A bad new version fails and the old one keeps serving.
        ads.patch_spec("sql", {"path": str(bad)})
        ads.assign("sql", 22)
        want = {2: "Ready", 22: "Failed"}
        fleet.wait_for(lambda: fleet.states(ads, "w1", namespace) == want, 30, lambda: w.log()[-3000:])
        assert fleet.report(ads, "w1", namespace)[22]["reason"] == "UnknownTargetModule"
        # A good one replaces it; the old version is dropped only once the new one is Ready.
        ads.patch_spec("sql", {"path": str(v3)})
        ads.assign("sql", 23)
        fleet.wait_for(
            lambda: fleet.states(ads, "w1", namespace) == {23: "Ready"}, 30, lambda: w.log()[-3000:]
        )
        log = w.log()
        assert log.index("id 23 Ready") < log.index("dropped adapter " + f"{namespace}/sql id 2 ")
        assert w.stop() == 0


def test_status_writes_are_batched(kube, namespace, tmp_path, setup):
    base, root, ads = setup
    names = [f"b{i}" for i in range(12)]
    for i, n in enumerate(names):
        ads.create(fleet.adapter_obj(n, str(adapters_mod.write_adapter(root / n, seed=i))))
    with _worker(kube, tmp_path, namespace, base, root, extra=["--report-batch-seconds", "1"]) as w:
        fleet.wait_for(lambda: fleet.report(ads, "w1", namespace) == {}, 20, "the first (empty) report")
        fleet.wait_for(lambda: w.metrics(), 10, "metrics")
        before = w.metric("loraplane_worker_report_writes_total")
        start = time.monotonic()
        for i, n in enumerate(names, start=1):
            ads.assign(n, i)
        want = dict.fromkeys(range(1, 13), "Ready")
        fleet.wait_for(lambda: fleet.states(ads, "w1", namespace) == want, 30, lambda: w.log()[-3000:])
        writes = w.metric("loraplane_worker_report_writes_total") - before
        elapsed = time.monotonic() - start
        # 12 adapters x 3 transitions (Prefetching, Validating, Ready) = 36 changes, in fewer writes: at
        # most one per batch interval (1 s; a heartbeat, every 2 s, is a write too). A bound in writes
        # alone would depend on how long a loaded machine takes for the 36 changes; a quiet one, ~3 s.
        assert 1 <= writes <= elapsed / 1 + 1 and writes < 36, (writes, elapsed)
        assert w.stop() == 0


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import sys, loraplane.worker.main as m\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import at module level'\n"
        "sys.argv = ['loraplane-worker', '--help']\n"
        "m.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--max-lora-rank" in proc.stdout and "LORAPLANE_MAX_LORA_RANK" in proc.stdout


def test_control_mode_serves_the_same_probes_and_locks_adapters(kube, namespace, tmp_path, setup):
    """One HTTP server in both modes: control mode has /health, /ready, /metrics open and /adapters
    behind the API keys (here from the environment, two at once), and no /v1 and no alias paths."""

    base, root, ads = setup
    good = adapters_mod.write_adapter(root / "good", r=8)
    env = {"LORAPLANE_API_KEYS": "control-key-1,control-key-2"}
    with _worker(kube, tmp_path, namespace, base, root, env=env) as w:
        ads.create(fleet.adapter_obj("good", str(good)))
        ads.assign("good", 21)
        url = f"http://127.0.0.1:{w.port}"
        fleet.wait_for(lambda: fleet.states(ads, "w1", namespace) == {21: "Ready"}, 30, "Ready")
        fleet.wait_for(lambda: _get(url + "/ready").status_code == 200, 30, "/ready")
        assert _get(url + "/health").json() == {"status": "ok"}
        assert "loraplane_worker_adapters" in _get(url + "/metrics").text
        r = _get(url + "/adapters")
        assert r.status_code == 401 and r.json()["error"]["type"] == "InvalidApiKey"
        for key in ("control-key-1", "control-key-2"):
            listed = _get(url + "/adapters", key).json()
            assert [(a["id"], a["state"]) for a in listed] == [(21, "Ready")]
            assert listed[0]["adapter"] == f"{namespace}/good"  # who has which adapter: behind the key
        for path in ("/healthz", "/readyz", "/v1/models"):
            assert _get(url + path, "control-key-1").status_code == 404, path
        assert w.stop() == 0
    # The control-mode server imports no engine (no torch): a dry-run worker starts fast.
    code = (
        "import sys\n"
        "from loraplane.worker.api.webapp import build_app\n"
        "build_app(None, None, openai=False, reports=list)\n"
        "assert 'torch' not in sys.modules, 'the control-mode server imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _get(url, key=None):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url, headers=headers, timeout=10)


@pytest.mark.kubectl
def test_namespaced_watch_kubectl_view_and_report_recreated(kube, namespace, tmp_path, setup):
    base, root, ads = setup
    other_ns = kube.create_namespace()
    try:
        other = fleet.Adapters(kube, other_ns)
        mine = adapters_mod.write_adapter(root / "mine")
        ads.create(fleet.adapter_obj("mine", str(mine)))
        ads.assign("mine", 1)
        other.create(fleet.adapter_obj("theirs", str(mine)))
        other.assign("theirs", 2)
        with _worker(kube, tmp_path, namespace, base, root, extra=["--namespaces", namespace]) as w:
            fleet.wait_for(
                lambda: fleet.states(ads, "w1", namespace) == {1: "Ready"}, 30, lambda: w.log()[-3000:]
            )
            out = kube.kubectl("get", "loraworkers", "-n", namespace).stdout
            header, row = out.splitlines()[:2]
            assert header.split()[:4] == ["NAME", "BASE", "MODEL", "READY"]
            assert row.split()[:4] == ["w1", fleet.BASE_MODEL, "1", "0"]
            # Deleted by hand: the worker recreates its report (at the latest with the next heartbeat).
            kube.kubectl("delete", "loraworker", "w1", "-n", namespace)
            fleet.wait_for(
                lambda: fleet.states(ads, "w1", namespace) == {1: "Ready"}, 15, lambda: w.log()[-3000:]
            )
            assert fleet.states(other, "w1", other_ns) == {}
            assert w.stop() == 0
        other.close()
    finally:
        kube.delete_namespace(other_ns)


def test_worker_writes_only_its_own_loraworker(kube, namespace, tmp_path, setup, local_only):
    base, root, ads = setup
    kubeconfig = kube.kubeconfig_for_user("worker-under-audit")
    ads.create(fleet.adapter_obj("one", str(adapters_mod.write_adapter(root / "one"))))
    ads.assign("one", 1)
    w = fleet.WorkerProc(
        kubeconfig, tmp_path, name="audited", namespace=namespace, base_dir=base, local_root=root
    )
    with w:
        fleet.wait_for(
            lambda: fleet.states(ads, "audited", namespace) == {1: "Ready"}, 30, lambda: w.log()[-3000:]
        )
        assert w.stop() == 0
    mine = [e for e in kube.server.audit_log if e.user == "worker-under-audit"]
    writes = {
        (e.verb, e.resource, e.subresource, e.namespace, e.name)
        for e in mine
        if e.verb not in ("get", "list", "watch")
    }
    assert writes <= {
        ("create", "loraworkers", "", namespace, ""),
        ("create", "loraworkers", "", namespace, "audited"),
        ("patch", "loraworkers", "status", namespace, "audited"),
        ("patch", "loraworkers", "", namespace, "audited"),
        ("delete", "loraworkers", "", namespace, "audited"),
    }, writes
    assert ("patch", "loraworkers", "status", namespace, "audited") in writes
    assert not [e for e in mine if e.resource == "loraadapters" and e.verb not in ("list", "watch")]
