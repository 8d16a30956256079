"""catnet's speed, as ratios measured side by side in one run (absolute times vary by machine).

    python -m benchmarks.bench            # training loop vs the matrix-multiply floor, tracking cost
    python -m benchmarks.bench --torch    # also a PyTorch peer (pip install -e ".[bench]")
    python -m benchmarks.bench --scale    # also mini-batches streamed from HDF5 (benchmarks/scale.py)

Per-epoch times are the minimum over interleaved repeats, so a busy moment on the machine hits
the compared timings alike. The floor is the two tall-skinny products an epoch cannot avoid,
X @ W1 (forward) and X^T @ delta1 (first-layer gradient), with the same shapes and dtype.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = [20, 7]


def load_real(dtype):
    from catnet.data import flatten, load_dataset
    from catnet.preprocess import fit

    train, _ = load_dataset(ROOT / "data/raw/train_catvnoncat.h5", ROOT / "data/raw/test_catvnoncat.h5")
    train = flatten(train)
    return fit(train.x).apply(train.x, dtype), train.y


def per_call(fn, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def interleaved(fns: dict, n: int, repeats: int) -> dict[str, float]:
    """min over ``repeats`` rounds of the mean time per call of each fn, rounds interleaved."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            best[k] = min(best[k], per_call(fn, n))
    return best


def catnet_epoch(x, y, dtype, epochs: int):
    from catnet.network import init_network
    from catnet.train import fit

    net = init_network([x.shape[1], *HIDDEN, 1], np.random.default_rng(0), dtype=dtype)
    return lambda: fit(net, x, y, epochs=epochs, lr=1e-6)


def floor_fn(x, dtype):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((x.shape[1], HIDDEN[0])).astype(dtype)
    d1 = rng.standard_normal((x.shape[0], HIDDEN[0])).astype(dtype)
    return lambda: (x @ w1, x.T @ d1)


def torch_epoch(x, y, dtype, epochs: int):
    import torch

    torch.manual_seed(0)
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y.astype(dtype)).reshape(-1, 1)
    sizes = [x.shape[1], *HIDDEN, 1]
    ws = [torch.randn(a, b, dtype=tdtype).mul_((2.0 / (a + b)) ** 0.5).requires_grad_() for a, b in zip(sizes, sizes[1:])]

    def run():
        for _ in range(epochs):
            a = xt
            for w in ws:
                a = torch.sigmoid(a @ w)
            loss = 0.5 * ((yt - a) ** 2).sum()
            for w in ws:
                w.grad = None
            loss.backward()
            with torch.no_grad():
                for w in ws:
                    w -= 1e-6 * w.grad
    return run


def tracking_overhead(x, y, epochs: int, repeats: int) -> tuple[float, float]:
    """Seconds of the 2500-epoch training loop with per-epoch MLflow logging (as the train
    stage does it) and without, best of ``repeats``; the run's final flush is counted."""
    import tempfile

    from omegaconf import OmegaConf

    from catnet.network import init_network
    from catnet.train import fit
    from pipeline import tracking

    tmp = tempfile.mkdtemp()
    cfg = OmegaConf.create({
        "tracking": {"enabled": True, "uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "bench",
                     "run_name": "bench", "flush_seconds": 10.0},
        "data": {"train_path": str(ROOT / "data/raw/train_catvnoncat.h5"),
                 "test_path": str(ROOT / "data/raw/test_catvnoncat.h5")},
        "seed": 0,
    })
    client, exp = tracking.client_and_experiment(cfg)
    times = {"on": [], "off": []}
    for _ in range(repeats):
        for mode in ("off", "on"):
            net = init_network([x.shape[1], *HIDDEN, 1], np.random.default_rng(0), dtype=x.dtype)
            run = tracking.MlflowRun(client, client.create_run(exp).info.run_id, cfg.tracking.uri, 10.0) \
                if mode == "on" else tracking.NullRun()
            start = time.perf_counter()
            fit(net, x, y, epochs=epochs, lr=1e-6,
                on_epoch=lambda e, errs, run=run: run.log_epoch(e, {"train/error": errs["error"]}))
            run.flush()
            times[mode].append(time.perf_counter() - start)
    return min(times["on"]), min(times["off"])


def startup(repeats: int = 3) -> dict[str, float]:
    """Seconds from process start to the end of the first epoch of `python -m pipeline
    train.epochs=1`, as the train stage logs it, with tracking on and off (best of ``repeats``)."""
    import re
    import subprocess
    import sys
    import tempfile

    out = {}
    for mode in ("off", "on"):
        tmp = tempfile.mkdtemp()
        best = float("inf")
        for _ in range(repeats):
            proc = subprocess.run(
                [sys.executable, "-m", "pipeline", "train.epochs=1", f"paths.out_dir={tmp}/out",
                 f"tracking.enabled={'true' if mode == 'on' else 'false'}", f"tracking.uri=sqlite:///{tmp}/m.db"],
                cwd=ROOT, capture_output=True, text=True, check=True)
            best = min(best, float(re.search(r"first epoch done ([\d.]+) s", proc.stderr + proc.stdout).group(1)))
        out[mode] = best
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", action="store_true", help="include the PyTorch peer")
    parser.add_argument("--scale", action="store_true", help="also run benchmarks/scale.py")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from threadpoolctl import threadpool_info

    blas = ", ".join(f"{i['internal_api']} {i.get('version', '')} {i.get('architecture', '')} "
                     f"{i['num_threads']} threads" for i in threadpool_info() if i["user_api"] == "blas")
    print(f"BLAS: {blas}\nnetwork: {[12288, *HIDDEN, 1]} sigmoid, full batch of 209 images\n")
    rows = []
    for dtype in ("float32", "float64"):
        x, y = load_real(dtype)
        fns = {"catnet": catnet_epoch(x, y, dtype, 20), "floor": floor_fn(x, dtype)}
        if args.torch:
            fns["torch"] = torch_epoch(x, y, dtype, 20)
        t = interleaved(fns, n=5, repeats=args.repeats)
        t["catnet"] /= 20
        if "torch" in t:
            t["torch"] /= 20
        rows.append((dtype, t))
    print(f"{'dtype':8} {'catnet ms/epoch':>16} {'floor ms':>9} {'catnet/floor':>13}"
          + (f" {'torch ms/epoch':>15} {'catnet/torch':>13}" if args.torch else ""))
    for dtype, t in rows:
        line = f"{dtype:8} {t['catnet'] * 1e3:16.3f} {t['floor'] * 1e3:9.3f} {t['catnet'] / t['floor']:13.3f}"
        if args.torch:
            line += f" {t['torch'] * 1e3:15.3f} {t['catnet'] / t['torch']:13.3f}"
        print(line)

    x, y = load_real("float32")
    on, off = tracking_overhead(x, y, epochs=2500, repeats=3)
    print(f"\ntracking: 2500 epochs float32, MLflow on {on:.2f} s, off {off:.2f} s, ratio {on / off:.3f}")
    s = startup()
    print(f"start-up: first epoch done {s['off']:.2f} s after process start with tracking off, "
          f"{s['on']:.2f} s with MLflow on (import, store, run creation)")
    if args.scale:
        from benchmarks.scale import report

        report()


if __name__ == "__main__":
    main()
