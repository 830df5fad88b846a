"""A child process that stops with the process that started it (the demo's operator and worker).

``loraplane demo`` runs the operator and the worker as processes. Killed with SIGKILL (or by the OOM
killer) it can stop nothing itself, and they would run on against its dead API server. So it puts its
pid in ``LORAPLANE_PARENT_PID``, and ``exit_with_parent()``, called first by both mains, takes it out of
the environment (their own children, such as vLLM's engine core, must not inherit it) and watches the
parent from a daemon thread: once the parent is gone, the process gets SIGTERM, its ordinary clean
stop, and is ended outright if that has not finished within ``GRACE_S``. Outside the demo (a pod,
a terminal) nothing is set and nothing runs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

ENV = "LORAPLANE_PARENT_PID"
POLL_S = 0.5
GRACE_S = 20.0

log = logging.getLogger(__name__)


def exit_with_parent() -> None:
    raw = os.environ.pop(ENV, "")
    if not raw.isdigit():
        return
    parent = int(raw)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        log.warning("the process that started this one (pid %d) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(GRACE_S)
        os._exit(1)

    threading.Thread(target=watch, name="loraplane-parent-watch", daemon=True).start()
