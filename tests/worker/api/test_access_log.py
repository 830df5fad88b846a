"""One access log line per /v1 completion (model, adapter ID, status, tokens, latency), and none when
it is turned off; the line's fields are the JSON log's fields."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest
from support.api import MakeServer

from loraplane import telemetry
from loraplane.worker.api.webapp import ServeSettings, build_app, serve_in_thread
from loraplane.worker.inference.engines import EngineSlot

ACCESS = "loraplane.worker.access"


def test_access_log_on_and_off(
    make_server: MakeServer, adapters: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    s = make_server()
    s.add(31, "sql", adapters["a0"])
    body = {"model": "sql", "prompt": [1, 5, 9], "max_tokens": 4, "ignore_eos": True}
    with caplog.at_level(logging.INFO, logger=ACCESS):
        assert httpx.post(s.url + "/v1/completions", json=body, timeout=60).status_code == 200
        assert (
            httpx.post(s.url + "/v1/completions", json={**body, "model": "nope"}, timeout=60).status_code
            == 404
        )
    lines = [r for r in caplog.records if r.name == ACCESS]
    assert len(lines) == 2, [r.getMessage() for r in lines]
    ok, missing = lines
    assert (ok.model, ok.adapter_id, ok.status, ok.prompt_tokens, ok.completion_tokens) == (
        "sql",
        31,
        200,
        3,
        4,
    )
    assert 0 < ok.latency_s < 60 and ok.request_id.startswith("cmpl")
    assert "model=sql adapter_id=31 status=200" in ok.getMessage()
    assert (missing.model, missing.adapter_id, missing.status) == ("unknown", None, 404)
    record = json.loads(telemetry.JsonFormatter("worker").format(ok))
    assert {
        "time",
        "level",
        "logger",
        "message",
        "component",
        "model",
        "adapter_id",
        "latency_s",
    } <= record.keys()

    caplog.clear()
    quiet = build_app(EngineSlot(s.engine), s.registry, ServeSettings(access_log=False))
    with serve_in_thread(quiet) as url, caplog.at_level(logging.INFO, logger=ACCESS):
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
        metrics = httpx.get(url + "/metrics").text  # the HTTP side counts requests, per server
    assert not [r for r in caplog.records if r.name == ACCESS]
    assert 'loraplane_worker_requests_total{model="sql",status="200"} 1.0' in metrics  # still counted


def test_json_formatter_carries_kopf_object_references() -> None:
    record = logging.LogRecord("kopf.objects", logging.WARNING, __file__, 1, "handler failed", None, None)
    record.k8s_ref = {
        "kind": "LoRAAdapter",
        "namespace": "team-a",
        "name": "sql",
        "uid": "u1",
        "apiVersion": "x",
    }
    record.settings = object()  # kopf internals never reach the line
    out = json.loads(telemetry.JsonFormatter("operator").format(record))
    assert out["object"] == {"kind": "LoRAAdapter", "namespace": "team-a", "name": "sql", "uid": "u1"}
    assert (out["component"], out["level"], out["message"]) == ("operator", "WARNING", "handler failed")
    assert "settings" not in out and "k8s_ref" not in out
