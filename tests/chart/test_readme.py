"""charts/loraplane/README.md is generated from values.schema.json and values.yaml and kept current."""

from __future__ import annotations

import subprocess
import sys

from support import chartkit

SCRIPT = chartkit.REPO / "scripts" / "chart_readme.py"


def test_chart_readme_is_current() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + " (run: python scripts/chart_readme.py)"


def test_chart_readme_lists_every_value() -> None:
    text = (chartkit.CHART / "README.md").read_text()
    for key in (
        "`global`",
        "`imagePullSecrets`",
        "`metrics.prometheusRule.enabled`",
        "`inferencePool.enabled`",
    ):
        assert key in text, key
    for key in ("`cache.budgetBytes`", "`maxModelLen`", "`topologySpreadConstraints`", "`sidecars`"):
        assert key in text.split("## Pool keys", 1)[1], key
