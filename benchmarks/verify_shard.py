"""Benchmark: the cost of verifying a shard's content canonically (privdistill.shard.verify_tar: canonical tar
re-serialisation, PNG chunk/IHDR/CRC checks with bounded inflation, canonical sample JSON, prompts) against the
verification it replaced (file sha256, member hashes, PIL ``verify()`` of each PNG, JSON keys), reimplemented
here as the baseline. Same shard bytes, same process, passes alternated; medians reported.

Usage:
  .venv/bin/python benchmarks/verify_shard.py                    # 2000 samples at 64x64, 5 repetitions
  .venv/bin/python benchmarks/verify_shard.py --samples 500 --resolution 28 --reps 3
Writes benchmarks/results/verify_shard.json (use --out to write elsewhere).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np


def baseline_verify(tar_path: Path, manifest) -> None:
    """The pre-canonical check: whole-file hash, member hashes, PIL verify() (CRC only, no inflation), JSON keys."""
    from PIL import Image

    from privdistill.shard import sha256_bytes, sha256_path

    assert sha256_path(tar_path) == manifest.tar_sha256
    with tarfile.open(tar_path, "r:") as tar:
        for info in tar:
            data = tar.extractfile(info).read()
            assert sha256_bytes(data) == manifest.members[info.name]
            if info.name.endswith(".png"):
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
            else:
                assert set(json.loads(data)) <= {"sample_id", "label", "class_name", "prompt"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "verify_shard.json")
    args = ap.parse_args()

    from privdistill.data.types import ImageSet
    from privdistill.identity import generate_key
    from privdistill.shard import SHARD_TAR, prompt_vocabulary, verify_tar, write_shard

    rng = np.random.default_rng(0)
    n, r = args.samples, args.resolution
    names = ["Trouser", "Sneaker", "Bag"]
    labels = rng.integers(0, 3, n)
    kept = ImageSet(images=rng.uniform(-1, 1, (n, 1, r, r)).astype(np.float32), labels=labels, class_names=names,
                    prompts=[f"an image of a {names[i]}" for i in labels])
    with tempfile.TemporaryDirectory() as tmp:
        vocab = prompt_vocabulary("an image of a {label}", names)
        m = write_shard(kept, Path(tmp) / "s", site_id="site-a", shard_id="bench", config_hash="0" * 64,
                        privacy={"kept": n}, key=generate_key(), vocabulary=vocab)
        tar = Path(tmp) / "s" / SHARD_TAR
        runs = {"canonical": lambda: verify_tar(tar, m, vocabulary=vocab), "baseline": lambda: baseline_verify(tar, m)}
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in runs}
        for rep in range(args.reps):
            for name in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                t0 = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"samples": n, "resolution": r, "tar_bytes": m.tar_size, "reps": args.reps, "seconds": times,
              "median_s": med, "ratio_canonical_over_baseline": med["canonical"] / med["baseline"],
              "canonical_mib_per_s": m.tar_size / med["canonical"] / 2**20}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{n} samples {r}x{r}, tar {m.tar_size / 2**20:.1f} MiB: canonical {med['canonical']:.3f} s, "
          f"baseline {med['baseline']:.3f} s, ratio {result['ratio_canonical_over_baseline']:.2f} "
          f"({result['canonical_mib_per_s']:.0f} MiB/s)")


if __name__ == "__main__":
    main()
