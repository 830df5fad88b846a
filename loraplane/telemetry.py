"""What the operator and the worker share for observability: log format, build info, no _created series.

Both components log through ``configure_logging``: text for people, or one JSON object per line with the
same fields in both (``time``, ``level``, ``logger``, ``message``, ``component``; ``object`` when kopf
logs about a Kubernetes object; ``exception`` with a traceback; and any ``extra=`` fields, such as
the worker's access log). Metric names carry one prefix per component (``loraplane_operator_``,
``loraplane_worker_``); ``build_info`` publishes the version the process runs.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
from datetime import UTC, datetime

import prometheus_client

from loraplane.version import __version__

# Counters and histograms would each get a `_created` series: a timestamp per label set that no
# dashboard or alert here reads, and that doubles the series count of every labelled counter.
prometheus_client.disable_created_metrics()

LOG_FORMATS = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# kopf's own record attributes: k8s_ref is logged as `object`, the rest are internals.
_KOPF = {"k8s_ref", "k8s_skip", "settings"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record with the fields named in the module docstring."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "component": self.component,
        }
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict):
            out["object"] = {k: ref[k] for k in ("kind", "namespace", "name", "uid") if ref.get(k)}
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in _KOPF and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted (and scrubbed) when the record was made: worker/redaction.py
            out["exception"] = record.exc_text
        return json.dumps(out, default=str)


def formatter(component: str, log_format: str) -> logging.Formatter:
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    return JsonFormatter(component) if log_format == "json" else logging.Formatter(_TEXT)


def configure_logging(component: str, *, level: str = "INFO", log_format: str = "text") -> None:
    """Root logger -> stderr in the given format (the worker; the operator reuses ``formatter``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(component, log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


_BUILD_INFO: dict[str, prometheus_client.Gauge] = {}


def build_info(component: str) -> None:
    """``loraplane_<component>_build_info{version, python} 1`` in the process registry (idempotent)."""
    if component in _BUILD_INFO:
        return
    gauge = prometheus_client.Gauge(
        f"loraplane_{component}_build_info",
        "Always 1; the labels say which loraplane version and Python this process runs.",
        ["version", "python"],
    )
    gauge.labels(version=__version__, python=platform.python_version()).set(1)
    _BUILD_INFO[component] = gauge
