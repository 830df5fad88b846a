"""Prefetch throughput divided by a plain file copy of the same bytes on the same disk, in one run.

For each source kind (local directory; S3 through boto3 against moto's server on 127.0.0.1;
the Hub through huggingface_hub against the tests' local Hub endpoint) it times
Prefetcher.prefetch of an adapter whose weights file is --mb MiB into a fresh cache, and
shutil.copyfile of the same file into the same directory tree, alternating, --repeat times, and
prints the medians and ratio = copy_time / prefetch_time (1.0 = as fast as a copy; target >= 0.8
for local). The prefetch hashes every byte (sha256), verifies sizes and checksums and fsyncs
before the atomic rename; the copy does none of that, so copy+fsync and "sha256 alone" (one core
hashing the file from the page cache: the floor for any prefetch that checksums) are printed too.

    python benchmarks/bench_prefetch.py [--mb 256] [--repeat 5] [--dir /path/on/the/cache/disk] [--kinds local,s3,hf]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from loraplane.worker import cache as c
from loraplane.worker import sources as s
from loraplane.worker.prefetch import Prefetcher


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _make_adapter(d: Path, mb: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 16}')
    # A well-formed safetensors file (the cache checks the header as soon as it arrives) of mb MiB.
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # a LoRA tensor's name
    header = json.dumps({key: {"dtype": "F32", "shape": [mb << 18], "data_offsets": [0, mb << 20]}}).encode()
    header += b" " * (-len(header) % 8)
    block = os.urandom(1 << 20)
    with open(d / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        for _ in range(mb):
            f.write(block)


def _copy(src: Path, work: Path, *, fsync: bool) -> Callable[[], object]:
    def run() -> None:
        dst = work / f"copy-{time.monotonic_ns()}"
        shutil.copyfile(src, dst)
        if fsync:
            fd = os.open(dst, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

    return run


def _prefetch(resolved: s.ResolvedSource, work: Path, settings: s.SourceSettings) -> Callable[[], object]:
    def run() -> None:
        root = work / f"cache-{time.monotonic_ns()}"
        Prefetcher(c.CacheIndex(root, 1 << 40), sources_settings=settings).prefetch(resolved)

    return run


def _sha256(src: Path) -> Callable[[], object]:
    def run() -> None:
        h, buf = hashlib.sha256(), bytearray(8 << 20)
        with open(src, "rb") as f:
            while n := f.readinto(buf):
                h.update(memoryview(buf)[:n])

    return run


def _bench(
    name: str, resolved: s.ResolvedSource, settings: s.SourceSettings, src: Path, work: Path, repeat: int
) -> None:
    copy, copy_sync, pre, sha = [], [], [], []
    _prefetch(resolved, work, settings)()  # warm-up: page cache, connections, imports
    for _ in range(repeat):
        copy.append(_timed(_copy(src, work, fsync=False)))
        copy_sync.append(_timed(_copy(src, work, fsync=True)))
        pre.append(_timed(_prefetch(resolved, work, settings)))
        sha.append(_timed(_sha256(src)))
        for p in work.iterdir():  # keep the disk from filling up
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    size_mb = resolved.size_bytes / 1e6
    mc, ms, mp, mh = (statistics.median(x) for x in (copy, copy_sync, pre, sha))
    print(f"{name:6s} {size_mb:6.1f} MB  copy {mc:6.3f}s ({size_mb / mc:5.0f} MB/s)  copy+fsync {ms:6.3f}s  "
          f"sha256 alone {mh:6.3f}s ({size_mb / mh:5.0f} MB/s)  prefetch {mp:6.3f}s ({size_mb / mp:5.0f} MB/s)  "
          f"ratio {mc / mp:4.2f}  vs copy+fsync {ms / mp:4.2f}  vs max(copy+fsync, sha256) {max(ms, mh) / mp:4.2f}",
          flush=True)  # fmt: skip


def _servers() -> object:
    path = Path(__file__).parents[1] / "tests" / "support" / "servers.py"
    spec = importlib.util.spec_from_file_location("worker_servers", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["worker_servers"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="weights file size in MiB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None, help="a directory on the disk to measure (default: the temp dir)")
    ap.add_argument("--kinds", default="local,s3,hf")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-prefetch-") as tmp:
        base = Path(tmp)
        src_dir, work = base / "src" / "adapter", base / "work"
        work.mkdir()
        _make_adapter(src_dir, args.mb)
        weights = src_dir / "adapter_model.safetensors"
        print(f"prefetch vs copy, {args.mb} MiB weights, median of {args.repeat}, disk under {base}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        if "local" in kinds:
            settings = s.SourceSettings(local_roots=(base / "src",))
            _bench("local", s.resolve(str(src_dir), None, settings), settings, weights, work, args.repeat)
        servers = _servers() if ("s3" in kinds or "hf" in kinds) else None
        if "s3" in kinds:
            import boto3
            from moto.server import ThreadedMotoServer

            os.environ.update(
                AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
            )
            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            url = f"http://{host}:{port}"
            client = boto3.session.Session().client("s3", endpoint_url=url, region_name="us-east-1")
            client.create_bucket(Bucket="bench")
            for p in src_dir.iterdir():
                client.upload_file(str(p), "bench", f"a/{p.name}")
            settings = s.SourceSettings(s3_endpoint_url=url)
            _bench("s3", s.resolve("s3://bench/a", None, settings), settings, weights, work, args.repeat)
            server.stop()
        if "hf" in kinds:
            hub, server = servers.start_hub(base / "hub")  # type: ignore[attr-defined]
            hub.chunk_bytes = 1 << 20
            hub.add_commit("bench/a", src_dir)
            settings = s.SourceSettings(hf_endpoint=hub.url)
            _bench("hf", s.resolve("bench/a", None, settings), settings, weights, work, args.repeat)
            server.shutdown()


if __name__ == "__main__":
    main()
