"""The ``loraplane`` command: small tools around the API and a no-cluster demo.

Each subcommand lives with the code it drives and is imported only when chosen, so
``loraplane --help`` starts fast and ``loraplane crds`` needs no torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "crds": (
        "loraplane.crds.render",
        "print the CRDs (| kubectl apply -f -), or write them with --output-dir DIR",
    ),
    "validate": (
        "loraplane.worker.validate",
        "check an adapter directory against a base model before applying it (exit 1 with the reasons)",
    ),
    "dev-apiserver": (
        "loraplane.localkube",
        "run the local Kubernetes API server and write a kubeconfig for kubectl",
    ),
    "demo": (
        "loraplane.demo",
        "end to end on this machine: API server, operator, worker, adapters, completions",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv[:2]:  # `loraplane --version` and `loraplane COMMAND --version`
        from loraplane.version import __version__

        print(f"loraplane {__version__}")
        return 0
    parser = argparse.ArgumentParser(
        prog="loraplane",
        description="LoRA adapters as Kubernetes objects: cluster-unique IDs, validated prefetch, multi-LoRA serving.",
        epilog="Every command takes --version; `loraplane COMMAND --help` for its options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.parse_args(argv)  # exits 2, listing the commands
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
