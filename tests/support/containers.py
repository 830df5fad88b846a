"""Run the images scripts/images.sh built (buildah's store) as a pod with the chart's settings runs them.

No OCI runtime starts on this machine (setrlimit is refused), so `Container` does what a runtime does with
the image's own config: it mounts the image's root filesystem READ-ONLY, mounts /tmp, /dev/shm and the
given volumes over it (tmpfs or host directories), and runs the image's ENTRYPOINT (+ CMD or the given
args) with the image's Env, WorkingDir and numeric USER in a private mount namespace (`unshare --mount`,
`chroot --userspec`) on the host network. The chart runs pods the same way (readOnlyRootFilesystem,
runAsNonRoot, emptyDir /tmp and cache), so a write outside the volumes fails here as it would there.

image(name) -> ref       the built image `name` (operator, worker-cpu, ...) from LORAPLANE_IMAGES, which
                         `make images` sets ("operator=localhost/loraplane/loraplane-operator:dev,...");
                         skips the test when it is not set
config(ref) -> dict      the image's OCI config (User, Env, Entrypoint, Cmd, WorkingDir, Labels)
Rootfs(ref)              the image's files mounted on the host for inspection; .path, .remove()
Container(ref, log, ...) one process from the image; start()/stop(), run() -> (exit code, output), `with`
shared_dir(path)         a host directory the image's non-root user can read (tmp_path is root's, 0700)
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

BUILT: dict[str, str] = dict(
    item.split("=", 1) for item in os.environ.get("LORAPLANE_IMAGES", "").split(",") if "=" in item
)


def image(name: str) -> str:
    """The reference of the built image `name` (operator, worker-cpu, ...); skips the test when not built."""
    if name not in BUILT:
        pytest.skip(f"image {name} not built: run `make images` (scripts/images.sh {name})")
    if shutil.which("buildah") is None or os.geteuid() != 0:
        pytest.skip("running images needs buildah and root (scripts/images.sh installs buildah)")
    return BUILT[name]


def config(ref: str) -> dict[str, Any]:
    """The image's OCI config (User, Env, Entrypoint, Cmd, WorkingDir, Labels)."""
    out = subprocess.run(
        ["buildah", "inspect", "--type", "image", ref], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)["OCIv1"]["config"]


class Rootfs:
    """The image's root filesystem mounted on the host (a buildah working container); remove() when done."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.name = f"lp-test-{uuid.uuid4().hex[:10]}"
        buildah("from", "--pull=never", "--name", self.name, ref)
        self.path = Path(buildah("mount", self.name).strip())

    def remove(self) -> None:
        buildah("umount", self.name)
        buildah("rm", self.name)


def buildah(*args: str) -> str:
    return subprocess.run(["buildah", *args], capture_output=True, text=True, check=True, timeout=120).stdout


class Container:
    """One process from an image with a read-only root filesystem (see the module docstring).

    volumes: container path -> host directory (bind-mounted read-only unless it ends in ':rw') or None
    (an empty tmpfs, as an emptyDir). args: replaces the image's CMD; command: replaces its ENTRYPOINT.
    """

    def __init__(
        self,
        ref: str,
        log_path: Path,
        *,
        args: Sequence[str] | None = None,
        command: Sequence[str] | None = None,
        volumes: dict[str, str | None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.ref, self.log_path = ref, log_path
        self.config = config(ref)
        entry = list(command) if command is not None else list(self.config.get("Entrypoint") or [])
        self.argv = entry + list(args if args is not None else self.config.get("Cmd") or [])
        self.volumes = {"/tmp": None, "/dev/shm": None, **(volumes or {})}
        self.env = dict(e.split("=", 1) for e in self.config.get("Env") or [])
        self.env.setdefault("HOME", "/")  # as container runtimes do for a uid with no passwd entry
        self.env.update(env or {})
        self.rootfs: Rootfs | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def script(self, root: Path) -> str:
        assert self.rootfs is not None
        lines = ["set -e", f"mount --bind {self.rootfs.path} {root}", f"mount -o remount,bind,ro {root}"]
        lines += [f"mount -t proc proc {root}/proc", f"mount --rbind /dev {root}/dev"]
        lines += [f"mount --rbind /sys {root}/sys", f"mount -o remount,bind,ro {root}/sys"]
        for target, source in self.volumes.items():
            where = shlex.quote(f"{root}{target}")
            if source is None:
                lines.append(f"mount -t tmpfs -o mode=1777,size=1g tmpfs {where}")
            else:
                path, _, mode = source.partition(":")
                lines.append(f"mount --bind {shlex.quote(path)} {where}")
                if mode != "rw":
                    lines.append(f"mount -o remount,bind,ro {where}")
        user = self.config.get("User") or "0:0"
        uid, _, gid = user.partition(":")
        env = [f"{k}={v}" for k, v in self.env.items()]
        workdir = self.config.get("WorkingDir") or "/"
        run = ["chroot", f"--userspec={uid}:{gid or uid}", f"--groups={gid or uid}", str(root)]
        run += ["/usr/bin/env", "-i", "-C", workdir, *env, *self.argv]
        lines.append("exec " + shlex.join(run))
        return "\n".join(lines)

    def start(self) -> Container:
        self.rootfs = Rootfs(self.ref)
        # Mount points must exist before the root goes read-only (a runtime creates them the same way).
        for target in self.volumes:
            (self.rootfs.path / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
        root = Path(f"/run/loraplane-test-{self.rootfs.name}")
        root.mkdir(parents=True)
        with open(self.log_path, "ab") as log:
            # unshare execs sh, sh execs chroot, chroot execs env, env execs the entry point: one pid.
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", self.script(root)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._root = root
        return self

    def run(self, timeout: float = 120) -> tuple[int, str]:
        """Start, wait for the exit; (exit code, output)."""
        self.start()
        try:
            assert self.proc is not None
            code = self.proc.wait(timeout)
        finally:
            self.stop()
        return code, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.rootfs is not None:
            self.rootfs.remove()
            self._root.rmdir()
            self.rootfs = None

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def shared_dir(path: Path) -> Path:
    """A host directory the image's non-root user can read (pytest's tmp_path is 0700, root's)."""
    path.mkdir(parents=True, exist_ok=True)
    for p in [path, *path.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return path
