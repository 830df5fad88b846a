"""The pytest plugin (entry point `pytest11`): the `--kubeconfig PATH` switch of the test suite.

Registered from the installed distribution, so pytest knows the option before it reads any argument as
a test path. pytest finds its configuration (rootdir, pyproject.toml) before plugins load, so in
`pytest --kubeconfig ~/.kube/config` the kubeconfig's folder is taken for the rootdir and the checkout's
settings are never read (or a config file above the kubeconfig is). The command is then run again
with `--kubeconfig=PATH`, the form pytest reads right.
"""

from __future__ import annotations

import os
import sys

import pytest

OPTION = "--kubeconfig"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        OPTION, default=None, metavar="PATH", help="run the integration tests against this real cluster"
    )


def joined(argv: list[str]) -> list[str]:
    """argv with `--kubeconfig PATH` written as `--kubeconfig=PATH` (unchanged when there is none)."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == OPTION:
            value = next(it, None)
            out.append(OPTION if value is None else f"{OPTION}={value}")
        else:
            out.append(arg)
    return out


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    path = early_config.known_args_namespace.kubeconfig
    args = list(early_config.invocation_params.args)
    if path is None or joined(args) == args:
        return  # no switch, or given as --kubeconfig=PATH: the configuration is the one the user meant
    # Given as two arguments, PATH was a test path when pytest looked for its configuration, which may
    # then be missing or come from a file above PATH: always run again with the joined form.
    if args != sys.argv[1:]:
        raise pytest.UsageError(f"pytest.main(): pass {OPTION}={path} (one argument)")
    capture = early_config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()  # give the new process the terminal, not capture files
    # sys.orig_argv holds the interpreter's own flags (`python -m pytest ...`) as well.
    os.execv(sys.executable, [sys.executable, *joined(sys.orig_argv[1:])])
