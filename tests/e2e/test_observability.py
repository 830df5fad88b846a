"""What a platform engineer's monitoring reads is what the processes publish.

A real operator and a real serving worker run against the API server fixture, both with JSON logs;
one adapter is registered and served. Then:
- every PromQL query of the Grafana dashboard and of the chart's PrometheusRule names only metrics
  the two processes' /metrics actually expose (scraped, parsed with prometheus_client's parser, and
  the queries parsed with a PromQL parser: no hard-coded list of names);
- neither exposes a ``_created`` series, and each has its build-info series;
- every log line of both is one JSON object with the same base fields, and the completion wrote one
  access line with model, adapter ID, status, tokens and latency.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import chartkit, fleet, models

pytestmark = [pytest.mark.slow]

BASE = fleet.BASE_MODEL
DASHBOARD = chartkit.CHART / "dashboards" / "loraplane.json"
BASE_FIELDS = {"time", "level", "logger", "message", "component"}


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def scrape(port: int) -> set[str]:
    """Every series name http://127.0.0.1:port/metrics declares: its samples, and for a labelled family
    with no sample yet (a failure counter before any failure) the names its TYPE line promises."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    return names


def selectors(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (Grafana's interval variables made concrete first)."""
    import promql_parser

    expr = re.sub(r"\$__(rate_)?interval", "5m", expr)
    names: set[str] = set()

    def walk(node: Any) -> None:
        if type(node).__name__ == "VectorSelector":
            names.add(node.name)
            return
        for attr in ("expr", "lhs", "rhs", "vector_selector", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (str, int, float)):
                walk(child)
        for child in getattr(node, "args", None) or []:
            walk(child)

    walk(promql_parser.parse(expr))
    return names


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def alert_queries() -> list[str]:
    rule = chartkit.by_kind(
        chartkit.manifests({"metrics": {"prometheusRule": {"enabled": True}}}), "PrometheusRule"
    )
    return [r["expr"] for g in rule[0]["spec"]["groups"] for r in g["rules"]]


def json_lines(text: str, what: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"{what}: a log line is not JSON: {line[:300]!r}")
        assert BASE_FIELDS <= record.keys(), (what, record)
        out.append(record)
    return out


def test_selectors_walk_the_whole_expression() -> None:
    """The name extraction itself: nested functions, binary operators, aggregations, subqueries."""
    expr = 'histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="1"}[$__rate_interval]))) / on() max(b) > bool 1 or -c offset 5m + max_over_time(d[10m:1m])'
    assert selectors(expr) == {"a_bucket", "b", "c", "d"}


def test_dashboard_and_alerts_query_what_the_processes_publish(kube, namespace: str, tmp_path: Path) -> None:
    base = models.make_tiny_llama(tmp_path / "models" / BASE)
    root = tmp_path / "adapters"
    models.make_peft_adapter(base, root / "alpha", r=4, alpha=8, seed=1)
    kube.apply_crds()
    op_port = fleet.free_port()
    worker = fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name="obs-worker", namespace=namespace, base_dir=base, local_root=root,
        extra=["--mode", "serve", "--device", "cpu", "--log-format", "json"],
    )  # fmt: skip
    op = fleet.OperatorProc(
        kube.kubeconfig, namespace, tmp_path / "operator.log",
        args=["--metrics-port", str(op_port), "--metrics-address", "127.0.0.1", "--log-format", "json"],
    )  # fmt: skip
    ads = fleet.Adapters(kube, namespace)
    with op, worker:
        ads.create(fleet.adapter_obj("alpha", f"file://{root / 'alpha'}"))
        fleet.wait_for(
            lambda: (ads.get("alpha").get("status") or {}).get("phase") == "Ready",
            120,
            lambda: worker.log()[-3000:],
        )
        url = f"http://127.0.0.1:{worker.port}"
        body = {"model": "alpha", "prompt": [5, 17, 42], "max_tokens": 3}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
        published = scrape(worker.port)
        published |= fleet.wait_for(
            lambda: (names := scrape(op_port)) and "loraplane_operator_workers" in names and names,
            30,
            "the operator's worker gauge",
        )
        adapter_id = ads.ids()["alpha"]
    ads.close()

    assert not [n for n in published if n.endswith("_created")], "no _created series"
    assert {"loraplane_worker_build_info", "loraplane_operator_build_info"} <= published
    queries = dashboard_queries() + alert_queries()
    assert len(queries) > 20
    for expr in queries:
        names = selectors(expr)
        assert names, expr
        assert names <= published, f"{sorted(names - published)} in {expr!r} are not published"

    worker_log = json_lines(worker.log(), "worker")
    operator_log = json_lines(op.log(), "operator")
    assert {r["component"] for r in worker_log} == {"worker"}
    assert {r["component"] for r in operator_log} == {"operator"}
    access = [r for r in worker_log if r["logger"] == "loraplane.worker.access"]
    assert len(access) == 1, access
    line = access[0]
    assert (line["model"], line["adapter_id"], line["status"]) == ("alpha", adapter_id, 200)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (3, 3)
    assert 0 < line["latency_s"] < 60 and line["request_id"].startswith("cmpl")
    assert any("alpha" in r["message"] for r in operator_log), "the operator logged the adapter's ID"


def test_prometheus_rule_alerts_are_the_ones_promised() -> None:
    values = {"metrics": {"prometheusRule": {"enabled": True, "disabled": ["LoraplaneAdaptersFailed"]}}}
    rule = chartkit.by_kind(chartkit.manifests(values), "PrometheusRule")[0]
    alerts = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(alerts) == {
        "LoraplaneAllocationStopped",
        "LoraplaneWorkersMissingHeartbeats",
        "LoraplaneEngineNotStepping",
        "LoraplaneOperatorNotChecking",
    }
    assert all(a["labels"]["severity"] in {"warning", "critical"} and a["for"] for a in alerts.values())
    assert yaml.safe_dump(rule)  # renders to plain YAML
    workers_only = {"operator": {"enabled": False}, "metrics": {"prometheusRule": {"enabled": True}}}
    rule = chartkit.by_kind(chartkit.manifests(workers_only), "PrometheusRule")[0]
    assert not [
        r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"].startswith("LoraplaneOperator")
    ]


def test_dashboard_configmap_carries_the_dashboard() -> None:
    values = {"metrics": {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}}}
    cm = chartkit.by_kind(chartkit.manifests(values), "ConfigMap")[0]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["loraplane.json"]) == json.loads(DASHBOARD.read_text())


def gauges(port: int) -> dict[str, float]:
    """'name{labels}' -> value of every sample on /metrics (label order as exposed)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_alert_gauges_see_stuck_allocation_and_stale_workers(kube, namespace: str, tmp_path: Path) -> None:
    """The series the alerts read move as the alerts assume: an adapter that cannot get an ID (no ledger
    namespace) is counted as waiting while no ID is assigned, and a killed worker turns stale."""
    from support import adapters

    kube.apply_crds()
    base = adapters.write_base_config(tmp_path / "base")
    port = fleet.free_port()
    args = [
        "--namespace", namespace, "--ledger-namespace", "no-such-namespace", "--liveness-interval", "0.5",
        "--heartbeat-window", "3", "--metrics-port", str(port), "--metrics-address", "127.0.0.1",
    ]  # fmt: skip
    worker = fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name="obs-control", namespace=namespace, base_dir=base, local_root=tmp_path
    )
    ads = fleet.Adapters(kube, namespace)
    with fleet.OperatorProc(kube.kubeconfig, None, tmp_path / "operator.log", args=args) as op, worker:
        ads.create(fleet.adapter_obj("stuck", "org/stuck"))
        live = f'loraplane_operator_workers{{base_model="{BASE}",state="live"}}'
        stale = f'loraplane_operator_workers{{base_model="{BASE}",state="stale"}}'

        def state() -> dict[str, float]:
            try:
                return gauges(port)
            except OSError:
                return {}

        seen = fleet.wait_for(
            lambda: (
                (g := state()).get("loraplane_operator_adapters_waiting_for_id") == 1
                and g.get(live) == 1
                and g
            ),
            60,
            lambda: op.log()[-3000:],
        )
        assert seen.get("loraplane_operator_ids_assigned_total") == 0  # the AllocationStopped condition
        assert seen["loraplane_operator_last_tick_timestamp_seconds"] > 0
        worker.kill()  # no clean stop: its LoRAWorker stays, its heartbeat ages
        fleet.wait_for(
            lambda: state().get(stale) == 1 and state().get(live) == 0, 30, lambda: op.log()[-3000:]
        )
    ads.close()
