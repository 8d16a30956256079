"""Mini-batch training streamed from HDF5: peak memory and epoch time as the set grows.

    python -m benchmarks.scale                      # sets of 2500 .. 20000 synthetic images
    python -m benchmarks.scale make --n 20000 --out big.h5   # only write a synthetic set

A synthetic set has the catvnoncat schema (train_set_x (N, 64, 64, 3) uint8, train_set_y) and is
written 1000 images at a time. Each size trains in a fresh process (so its peak resident memory is
its own): the default network, float32, shuffled batches of 256 read from the file as needed.
The float32 copy of 20,000 images alone would take 983 MB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_synthetic(path: Path, n: int, seed: int = 0, chunk: int = 1000) -> Path:
    import h5py

    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        x = f.create_dataset("train_set_x", shape=(n, 64, 64, 3), dtype=np.uint8)
        y = rng.integers(0, 2, size=n)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block = rng.integers(0, 200, size=(stop - start, 64, 64, 3), dtype=np.uint8)
            block[y[start:stop] == 1] += 40  # cats a little brighter: something to learn
            x[start:stop] = block
        f["train_set_y"] = y
        f["list_classes"] = np.array([b"non-cat", b"cat"])
    return path


def train_streamed(path: Path, epochs: int, batch_size: int) -> dict:
    """Train from ``path`` without loading it; seconds per epoch and peak RSS (MB)."""
    from catnet.hdf5 import H5Images
    from catnet.network import init_network
    from catnet.train import fit_minibatch

    times = []
    with H5Images(path, "train", (64, 64, 3)) as src:
        net = init_network([src.features, 20, 7, 1], np.random.default_rng(0), dtype=np.float32)
        take = lambda idx: src.take(idx).astype(np.float32) / np.float32(255)  # noqa: E731
        start = time.perf_counter()
        fit_minibatch(net, take, src.y, epochs=epochs, lr=0.001, batch_size=batch_size,
                      rng=np.random.default_rng(0),
                      on_epoch=lambda e, errs: times.append(time.perf_counter()))
    epoch_times = np.diff([start, *times])
    return {"n": len(src.y), "epoch_s": float(np.min(epoch_times)), "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    exec from the parent, so a child of a big process would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


STAGES = ("load", "normalize", "train", "evaluate")


def stage_peak_mb(stage: str, overrides: list[str]) -> float:
    """Peak resident memory of ``python -m pipeline.<stage> <overrides>`` in its own process,
    as ``dvc repro`` runs it (read from the stage's process at its exit)."""
    code = ("import atexit, runpy, sys; from benchmarks.scale import peak_rss_mb; "
            "atexit.register(lambda: print('PEAK_MB', peak_rss_mb(), file=sys.stderr)); "
            f"sys.argv = ['pipeline.{stage}', *{overrides!r}]; runpy.run_module('pipeline.{stage}', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline.{stage} failed: {proc.stderr[-2000:]}")
    return float(proc.stderr.split("PEAK_MB")[-1].split()[0])


def report(sizes=(2500, 5000, 10000, 20000), epochs: int = 3, batch_size: int = 256) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = make_synthetic(Path(tmp) / f"syn{n}.h5", n)
            out = subprocess.run([sys.executable, "-m", "benchmarks.scale", "train", "--file", str(path),
                                  "--epochs", str(epochs), "--batch-size", str(batch_size)],
                                 cwd=ROOT, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            if n == max(sizes):  # the pipeline's stages on the largest set, MLflow on
                overrides = [f"data.train_path={path}", f"train.batch_size={batch_size}", f"train.epochs={epochs}",
                             f"paths.out_dir={tmp}/out", f"tracking.uri=sqlite:///{tmp}/mlflow.db"]
                pipeline_peaks = {stage: stage_peak_mb(stage, overrides) for stage in STAGES}
            path.unlink()
    n = np.array([r["n"] for r in rows], dtype=float)
    t = np.array([r["epoch_s"] for r in rows])
    slope, intercept = np.polyfit(n, t, 1)
    r2 = 1 - np.sum((t - (slope * n + intercept)) ** 2) / np.sum((t - t.mean()) ** 2)
    print(f"\nscale: mini-batches of {batch_size} streamed from HDF5, float32, default network")
    print(f"{'images':>8} {'s/epoch':>9} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['n']:8d} {r['epoch_s']:9.3f} {r['peak_rss_mb']:12.0f}")
    print(f"epoch time = {slope * 1e3:.3f} ms per image x N {intercept:+.3f} s  (linear fit, R^2 = {r2:.4f})")
    print(f"pipeline stages on {max(sizes)} images (train.batch_size={batch_size}, MLflow on), each in its own "
          "process as under dvc repro, peak RSS MB: "
          + ", ".join(f"{stage} {mb:.0f}" for stage, mb in pipeline_peaks.items())
          + "  (images read from the HDF5 file and from data/flat a block or a batch at a time)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    mk = sub.add_parser("make", help="write a synthetic set")
    mk.add_argument("--n", type=int, default=20000)
    mk.add_argument("--out", type=Path, required=True)
    tr = sub.add_parser("train", help="train streamed from one file (used by the report)")
    tr.add_argument("--file", type=Path, required=True)
    tr.add_argument("--epochs", type=int, default=3)
    tr.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    if args.cmd == "make":
        make_synthetic(args.out, args.n)
    elif args.cmd == "train":
        print(json.dumps(train_streamed(args.file, args.epochs, args.batch_size)))
    else:
        report()


if __name__ == "__main__":
    main()
