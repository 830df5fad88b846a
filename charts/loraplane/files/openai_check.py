"""`helm test` for one worker pool: its Service answers the OpenAI API and the base model generates.

Environment: URL (the pool's Service), MODEL (the served base-model name), MODE (serve or control),
API_KEY (optional: the API key Secret's value; its first key is used). Exit 0 with one line on success; exit 1 naming what failed.
"""

import json
import os
import sys
import urllib.error
import urllib.request

URL, MODEL, MODE = os.environ["URL"].rstrip("/"), os.environ["MODEL"], os.environ.get("MODE", "serve")
HEADERS = {"Content-Type": "application/json"}
KEYS = [k.strip() for k in os.environ.get("API_KEY", "").splitlines() if k.strip() and not k.startswith("#")]
if KEYS:
    HEADERS["Authorization"] = "Bearer " + KEYS[0]


def call(path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(URL + path, data=data, headers=HEADERS)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        sys.exit(f"FAIL {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}")
    except (OSError, ValueError) as exc:
        sys.exit(f"FAIL {path}: {exc}")


if MODE == "control":  # no weights loaded: the control path's readiness is what there is to check
    call("/ready")
    print(f"ok: {URL} is ready (control mode)")
    sys.exit(0)
served = [m.get("id") for m in call("/v1/models").get("data", [])]
if MODEL not in served:
    sys.exit(f"FAIL /v1/models: {MODEL!r} is not listed (got {served})")
out = call("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
if not out.get("choices") or (out.get("usage") or {}).get("completion_tokens", 0) < 1:
    sys.exit(f"FAIL /v1/completions: no token generated: {out}")
print(
    f"ok: {URL} lists {len(served)} models and {MODEL!r} generated {out['usage']['completion_tokens']} token"
)
