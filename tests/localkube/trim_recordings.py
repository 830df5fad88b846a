"""Copy the recorded conversations into tests/localkube/recordings/, trimming bodies nobody compares.

Run once when the corpus changes: `python tests/localkube/trim_recordings.py /path/to/kube-recordings`.
Discovery and OpenAPI bodies are replaced by their kind and top-level keys: their content depends on
which other CRDs existed on the recording cluster, so the replay compares their shape only.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent / "recordings"
FILES = [
    f"{n}.jsonl"
    for n in (
        "01-discovery",
        "02-crd-register",
        "03-create-and-validate",
        "04-kubectl-get-table",
        "05-concurrency",
        "06-status-subresource",
        "07-list-watch",
        "08-delete-finalizers-gc",
        "09-events-leases",
        "10-kopf",
        "11-python-client",
    )
]
LIMIT = 16 * 1024


def trim(body: Any, path: str) -> Any:
    if not isinstance(body, dict):
        return body
    big = len(json.dumps(body)) > LIMIT
    if big and (path.startswith("/openapi") or path in ("/api", "/apis") or path.count("/") <= 3):
        return {
            "_trimmed": True,
            "keys": sorted(body),
            **{k: body[k] for k in ("kind", "apiVersion") if k in body},
        }
    return body


def main(src: str) -> None:
    HERE.mkdir(exist_ok=True)
    for name in FILES:
        out = []
        for line in (Path(src) / name).read_text().splitlines():
            rec = json.loads(line)
            rec["response_body"] = trim(rec["response_body"], rec["path"])
            out.append(json.dumps(rec, separators=(",", ":")))
        (HERE / name).write_text("\n".join(out) + "\n")
    for extra in ("crd.yaml", "kopf-peering-crds.yaml", "README.md"):
        shutil.copy(Path(src) / extra, HERE / extra)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/kube-recordings")
