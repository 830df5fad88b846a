"""What provenance costs a prefetch: loraplane's checks next to model-signing's own verification, one run.

An adapter with a --mb MiB weights file, signed with a key by model-signing. Timed, alternating,
--repeat times (medians printed):

  prefetch        Prefetcher.prefetch of the local adapter into a fresh cache (hashes as it copies)
  digest+verify   what the worker adds after it: spec.digest from the cache's hashes, and the
                  signature checked against them (loraplane.worker.provenance)
  library verify  model_signing.verifying.Config().verify(): the same check reading every file again

and the ratios digest+verify / prefetch (what pinning and signatures add to a prefetch) and
library verify / digest+verify (what not reading the bytes twice saves).

    python benchmarks/bench_provenance.py [--mb 256] [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_prefetch
from support import signing

from loraplane.worker import cache as c
from loraplane.worker import provenance
from loraplane.worker import sources as s
from loraplane.worker.prefetch import Prefetcher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256, help="weights file size in MiB")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import model_signing

    with tempfile.TemporaryDirectory(prefix="bench-provenance-") as tmp:
        root = Path(tmp)
        d = root / "adapters" / "a"
        bench_prefetch._make_adapter(d, args.mb)  # a well-formed safetensors file of --mb MiB
        key, public = signing.key_pair(root / "keys", "bench")
        signing.sign_with_key(d, key)
        trust = provenance.Trust(public_keys=(public,))
        settings = s.SourceSettings(local_roots=(root / "adapters",), max_file_bytes=4 << 30)
        library = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public)
        library.set_hashing_config(
            model_signing.hashing.Config().set_ignored_paths(paths=["model.sig", "manifest.json"])
        )
        provenance.verify(d / "model.sig", provenance.file_digests(d), trust)  # warm the imports
        times: dict[str, list[float]] = {"prefetch": [], "digest+verify": [], "library verify": []}
        for i in range(args.repeat):
            cache_dir = root / f"cache{i}"
            t0 = time.perf_counter()
            entry = Prefetcher(
                c.CacheIndex(cache_dir, 8 << 30), sources_settings=settings, max_file_bytes=4 << 30
            ).prefetch(s.resolve(str(d), None, settings))
            t1 = time.perf_counter()
            digest = entry.digest
            provenance.check_digest(digest, digest, "bench")
            provenance.verify(entry.path / "model.sig", entry.file_digests, trust)
            t2 = time.perf_counter()
            library.verify(entry.path, entry.path / "model.sig")
            t3 = time.perf_counter()
            times["prefetch"].append(t1 - t0)
            times["digest+verify"].append(t2 - t1)
            times["library verify"].append(t3 - t2)
            shutil.rmtree(cache_dir)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"adapter weights {args.mb} MiB, {args.repeat} runs (medians)")
        for k, v in med.items():
            print(f"  {k:15s} {v * 1000:9.1f} ms")
        print(f"digest+verify / prefetch       = {med['digest+verify'] / med['prefetch']:.4f}")
        print(f"library verify / digest+verify = {med['library verify'] / med['digest+verify']:.1f}")


if __name__ == "__main__":
    main()
