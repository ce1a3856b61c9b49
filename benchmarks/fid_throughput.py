"""FID feature throughput on this machine, and how FID's small-sample bias shrinks with the sample count.

Fashion-MNIST train and test come from one distribution, so their true FID is close to 0; what a finite
sample measures is mostly bias. This script draws seeded random subsets of both splits, extracts the
Inception features of the first ``max(sizes)`` images of each (incrementally, caching progress on disk so
an interrupted run resumes), and reports FID(train[:n], test[:n]) for every n in ``--sizes``.

Usage (the 10k run pushes ~20k images through the network: ~40+ min on 2 CPU cores)::

    nohup .venv/bin/python benchmarks/fid_throughput.py --sizes 1000 5000 10000 > /tmp/fid_bench.log 2>&1 &

Fashion-MNIST is read directly from the idx files of Debian's ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``). Results go to ``--out`` (JSON, rewritten after every size).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flowlib import fid as fidlib
from flowlib.results import atomic_write_json

DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}


def read_idx_images(path: Path) -> torch.Tensor:
    """An idx3 image file (gzip) -> uint8 tensor (N, 1, rows, cols)."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic, n, rows, cols = (int.from_bytes(raw[i:i + 4], "big") for i in range(0, 16, 4))
    if magic != 2051:
        raise ValueError(f"{path} is not an idx3 image file (magic {magic}, expected 2051)")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=16)
    if arr.size != n * rows * cols:
        raise ValueError(f"{path}: header says {n}x{rows}x{cols} but holds {arr.size} bytes")
    return torch.from_numpy(arr.reshape(n, 1, rows, cols).copy())


def measure_throughput(images: torch.Tensor, batch_sizes, n_images: int) -> dict[int, float]:
    """Images per second of :func:`flowlib.fid.inception_features` (resize + network), after a warm-up."""
    out = {}
    fidlib.inception_features(images[:4], batch_size=4, progress=False)  # warm-up (first call is slower)
    for bs in batch_sizes:
        t0 = time.perf_counter()
        fidlib.inception_features(images[:n_images], batch_size=bs, progress=False)
        out[bs] = n_images / (time.perf_counter() - t0)
        print(f"throughput batch {bs:3d}: {out[bs]:.2f} images/s ({n_images} images)", flush=True)
    return out


def prefix_features(images: torch.Tensor, split: str, seed: int, upto: int, cache_dir: Path,
                    batch_size: int, chunk: int = 500) -> np.ndarray:
    """Features of the first ``upto`` images of a seeded permutation, resuming from an on-disk prefix."""
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    path = cache_dir / f"fashion-mnist_{split}_perm-seed{seed}_prefix.npz"
    feats = np.zeros((0, fidlib.FEATURE_DIM))
    if path.is_file():
        with np.load(path) as d:
            if np.array_equal(d["perm"], perm.numpy()):
                feats = d["features"]
    while feats.shape[0] < upto:
        lo = feats.shape[0]
        hi = min(upto, lo + chunk)
        new = fidlib.inception_features(images[perm[lo:hi]], batch_size=batch_size,
                                        desc=f"{split} {lo}-{hi}")
        feats = np.concatenate([feats, new])
        fidlib._atomic_save_npz(path, features=feats, perm=perm.numpy())
    return feats[:upto]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[400, 1000, 5000, 10000],
                    help="sample counts n for FID(train[:n], test[:n]) (default: 400 1000 5000 10000)")
    ap.add_argument("--seed", type=int, default=0, help="train subset seed (test uses seed + 1)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--throughput-batch-sizes", type=int, nargs="*", default=[16, 32, 64])
    ap.add_argument("--throughput-images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache-dir", type=Path, default=fidlib.DEFAULT_CACHE_DIR)
    ap.add_argument("--out", type=Path, default=Path("results/benchmarks/fid_throughput.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    paths = {s: args.data_dir / f for s, f in FILES.items()}
    for p in paths.values():
        if not p.is_file():
            sys.exit(f"missing {p}: install Debian's dataset-fashion-mnist or pass --data-dir")
    data = {s: read_idx_images(p) for s, p in paths.items()}
    sizes = sorted(set(args.sizes))
    if sizes[0] < 2 or sizes[-1] > min(len(d) for d in data.values()):
        sys.exit(f"sizes must lie in [2, {min(len(d) for d in data.values())}], got {sizes}")

    result = {
        "machine": {"cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "torch": torch.__version__},
        "network": str(fidlib.find_weights()),
        "preprocessing": "grey->RGB, bilinear 299x299 (align_corners=False), (x-128)/128",
        "throughput_images_per_s": {},
        "fid_train_vs_test": [],
    }
    tp = measure_throughput(data["test"], args.throughput_batch_sizes, args.throughput_images)
    result["throughput_images_per_s"] = {str(k): round(v, 3) for k, v in tp.items()}
    atomic_write_json(args.out, result)

    for n in sizes:
        t0 = time.perf_counter()
        f_train = prefix_features(data["train"], "train", args.seed, n, args.cache_dir, args.batch_size)
        f_test = prefix_features(data["test"], "test", args.seed + 1, n, args.cache_dir, args.batch_size)
        t1 = time.perf_counter()
        res = fidlib.fid_from_features(f_test, f_train)
        t2 = time.perf_counter()
        row = {"n": n, "fid": round(res.value, 3), "text": str(res),
               "feature_seconds": round(t1 - t0, 1), "distance_seconds": round(t2 - t1, 1)}
        result["fid_train_vs_test"].append(row)
        atomic_write_json(args.out, result)
        print(f"n={n}: {res}  (features {t1 - t0:.0f} s, distance {t2 - t1:.1f} s)", flush=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
