"""catnet's speed, as ratios measured side by side in one run (absolute times vary by machine).

    python -m benchmarks.bench            # training loop vs the matrix-multiply floor, tracking cost
    python -m benchmarks.bench --torch    # also a PyTorch peer (pip install -e ".[bench]")
    python -m benchmarks.bench --scale    # also mini-batches streamed from HDF5 (benchmarks/scale.py)

Everything it prints also goes to benchmarks/results.md (overwritten each run), headed by the
machine, the date and the command: the figures docs/speed.md and the README quote.

Per-epoch times are the minimum over interleaved repeats, so a busy moment on the machine hits
the compared timings alike. The floor is the two tall-skinny products a direct (primal) epoch
cannot avoid, X @ W1 (forward) and X^T @ delta1 (first-layer gradient), with the same shapes and
dtype. catnet's default solver (``auto``, here ``dual``) avoids them: it keeps W1 = W1(0) + X^T A
and pays X X^T once (catnet.train._DualFirstLayer), so its per-epoch time is measured as the
difference of two training lengths, and the one-time cost is reported beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = [20, 7]


def load_real(dtype):
    from catnet.hdf5 import flatten, load_dataset
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


def catnet_fit(x, y, dtype, epochs: int, solver: str):
    from catnet.network import init_network
    from catnet.train import fit

    net = init_network([x.shape[1], *HIDDEN, 1], np.random.default_rng(0), dtype=dtype)
    return lambda: fit(net, x, y, epochs=epochs, lr=1e-6, solver=solver)


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


def tracking_overhead(x, y, epochs: int, repeats: int) -> dict[str, float]:
    """Seconds of the 2500-epoch training loop (default solver) with per-epoch MLflow logging
    as the train stage does it (buffer, then one ``log_batch``) and without, best of ``repeats``;
    and the seconds the write of those epochs takes after training."""
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
    from pipeline.tracking import store

    client, experiment_id = store.open_store(cfg)
    times = {"on": [], "off": [], "write": []}
    for _ in range(repeats):
        for mode in ("off", "on"):
            net = init_network([x.shape[1], *HIDDEN, 1], np.random.default_rng(0), dtype=x.dtype)
            run = tracking.MlflowRun(client, client.create_run(experiment_id).info.run_id) \
                if mode == "on" else tracking.NullRun()
            start = time.perf_counter()
            fit(net, x, y, epochs=epochs, lr=1e-6,
                on_epoch=lambda e, errs, run=run: run.log_epoch(e, {"train/error": errs["error"]}))
            times[mode].append(time.perf_counter() - start)
            start = time.perf_counter()
            run.flush()  # write the buffer
            if mode == "on":
                times["write"].append(time.perf_counter() - start)
                assert len(client.get_metric_history(run.run_id, "train/error")) == epochs
    return {k: min(v) for k, v in times.items()}


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


RESULTS = ROOT / "benchmarks" / "results.md"


class _Tee:
    """stdout, and a copy of everything written to it."""

    def __init__(self, out):
        self.out, self.parts = out, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def machine() -> str:
    """CPU model, cores, OS and Python: what the figures were measured on."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    """Run the benchmarks; print them and write them to benchmarks/results.md."""
    import contextlib
    import datetime
    import sys

    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        measure()
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    RESULTS.write_text(f"# catnet benchmarks\n\n- command: `python -m benchmarks.bench {' '.join(sys.argv[1:])}`"
                       f"\n- machine: {machine()}\n- date: {when}\n\nRatios are measured side by side in this one "
                       f"run; compare them, not absolute times across runs.\n\n```\n{''.join(tee.parts).strip()}\n```\n")
    print(f"\nwritten to {RESULTS.relative_to(ROOT)}")


def measure() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", action="store_true", help="include the PyTorch peer")
    parser.add_argument("--scale", action="store_true", help="also run benchmarks/scale.py")
    parser.add_argument("--sweeps", action="store_true", help="also run benchmarks/sweeps.py (whole commands)")
    parser.add_argument("--search", action="store_true", help="also run benchmarks/search.py (Optuna, pruned vs not)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from threadpoolctl import threadpool_info

    blas = ", ".join(f"{i['internal_api']} {i.get('version', '')} {i.get('architecture', '')} "
                     f"{i['num_threads']} threads" for i in threadpool_info() if i["user_api"] == "blas")
    print(f"BLAS: {blas}\nnetwork: {[12288, *HIDDEN, 1]} sigmoid, full batch of 209 images\n")
    rows = []
    short, long = 20, 420  # training lengths whose difference gives the dual form's per-epoch time
    for dtype in ("float32", "float64"):
        x, y = load_real(dtype)
        fns = {"primal": catnet_fit(x, y, dtype, short, "primal"), "floor": floor_fn(x, dtype),
               "dual_short": catnet_fit(x, y, dtype, short, "dual"), "dual_long": catnet_fit(x, y, dtype, long, "dual")}
        if args.torch:
            fns["torch"] = torch_epoch(x, y, dtype, short)
        t = interleaved(fns, n=3, repeats=args.repeats)
        t["primal"] /= short
        t["dual"] = (t["dual_long"] - t["dual_short"]) / (long - short)
        t["dual_setup"] = t["dual_short"] - short * t["dual"]  # X X^T, X W1(0), writing W1 back
        if "torch" in t:
            t["torch"] /= short
        rows.append((dtype, t))
    print("ms per epoch; ratios from the same run")
    print(f"{'dtype':8} {'dual':>7} {'primal':>7} {'floor':>7} {'torch':>7} {'dual/floor':>10} "
          f"{'primal/floor':>12} {'dual/torch':>10} {'primal/torch':>12} {'dual one-time':>13}")
    for dtype, t in rows:
        ms = {k: v * 1e3 for k, v in t.items()}
        torch_ms, na = ms.get("torch", float("nan")), "n/a"
        ratio = (lambda a: f"{a / torch_ms:.3f}") if "torch" in t else (lambda a: na)
        print(f"{dtype:8} {ms['dual']:7.3f} {ms['primal']:7.3f} {ms['floor']:7.3f} {torch_ms:7.3f} "
              f"{ms['dual'] / ms['floor']:10.3f} {ms['primal'] / ms['floor']:12.3f} {ratio(ms['dual']):>10} "
              f"{ratio(ms['primal']):>12} {ms['dual_setup']:10.1f} ms")
    print("(dual: the default solver, auto, on this data; primal: train.solver=primal)")

    x, y = load_real("float32")
    t = tracking_overhead(x, y, epochs=2500, repeats=9)
    print(f"\ntracking: 2500 epochs float32, training loop with MLflow on {t['on']:.3f} s, off {t['off']:.3f} s, "
          f"ratio {t['on'] / t['off']:.3f}; MLflow then writes the 2500 points in "
          f"{t['write']:.3f} s (one log_batch at the end of training)")
    s = startup()
    print(f"start-up: first epoch done {s['off']:.2f} s after process start with tracking off, "
          f"{s['on']:.2f} s with MLflow on (import, store, run creation)")
    if args.scale:
        from benchmarks.scale import report

        report()
    if args.sweeps:
        from benchmarks import sweeps

        sweeps.report()
        sweeps.report(lived=1000)  # the same commands into a store that has lived
    if args.search:
        from benchmarks import search

        search.report()


if __name__ == "__main__":
    main()
