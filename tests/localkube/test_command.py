"""`loraplane.localkube.main`: serves on a port and writes a kubeconfig a person can use with kubectl."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml


def test_main_serves_and_writes_kubeconfig(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kc.yaml"
    code = "import sys; from loraplane.localkube import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "--port", "0", "--kubeconfig", str(kubeconfig)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(tmp_path),
    )
    try:
        deadline = time.monotonic() + 30
        while not kubeconfig.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        config = yaml.safe_load(kubeconfig.read_text())
        url = config["clusters"][0]["cluster"]["server"]
        assert url.startswith("http://127.0.0.1:")
        assert config["current-context"] == "localkube"
        assert requests.get(url + "/version", timeout=5).json()["gitVersion"].startswith("v1.36")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "kubeconfig written to" in out
