"""What pruning buys an Optuna search, and whether it keeps both cores busy: whole commands.

    python -m benchmarks.search                  # 24 trials: unpruned, median, hyperband
    python -m benchmarks.search --trials 8       # a quick look

The same command three times, ``python -m pipeline -m hparams_search=optuna`` with its search
space, cross-validation (5 folds x 4 repeats) and sampler seed, on joblib with 2 workers: with
``hydra.sweeper.pruner=none``, with the preset's pruner (median) and with hyperband, each into a
new study and store. For each: the wall time from process start to exit, the CPU time of the search's processes
(the command and every process it started and reaped: resource.RUSAGE_CHILDREN) over cores x wall
time, the trials by state, and the best trial's cross-validated balanced accuracy. Printed as
ratios of the same run; the two commands alternate when ``--rounds`` is above 1.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"wall_ratio": 0.5, "best_gap": 0.01, "cpu_use": 0.85}  # issue #29, on 2 cores


def search(pruner: str, trials: int, workers: int, folder: Path, *extra: str) -> dict:
    """One whole search command; its wall and CPU seconds, trials by state, best value."""
    import optuna

    storage = folder / f"{pruner}.log"
    cmd = [sys.executable, "-m", "pipeline", "-m", "hparams_search=optuna", f"hydra.sweeper.n_trials={trials}",
           f"hydra.sweeper.n_jobs={workers}", "hydra/launcher=joblib", f"hydra.launcher.n_jobs={workers}",
           f"hydra.sweeper.pruner={pruner}", f"hydra.sweeper.storage={storage}",
           f"tracking.uri=sqlite:///{folder / pruner}.db", f"hydra.sweep.dir={folder / pruner}", "sweep.reuse=false", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({' '.join(cmd[1:])}):\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="catnet", storage=JournalStorage(JournalFileBackend(str(storage))))
    states = {}
    for t in study.trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    return {"wall": wall, "cpu": cpu, "states": states, "best": study.best_value,
            "best_params": study.best_params}


PRUNERS = ("none", "median", "hyperband")


def report(trials: int = 24, workers: int = 2, rounds: int = 1) -> dict:
    cores = os.cpu_count() or 1
    results: dict[str, list[dict]] = {p: [] for p in PRUNERS}
    with tempfile.TemporaryDirectory(prefix="catnet-bench-search-") as tmp:
        for r in range(rounds):
            for pruner in (PRUNERS if r % 2 == 0 else PRUNERS[::-1]):
                folder = Path(tmp) / f"round{r}"
                folder.mkdir(exist_ok=True)
                results[pruner].append(search(pruner, trials, workers, folder))
    best = {p: min(results[p], key=lambda x: x["wall"]) for p in PRUNERS}
    whole = best["none"]
    out = {}
    for p in PRUNERS:
        out[p] = {"wall": best[p]["wall"], "wall_ratio": best[p]["wall"] / whole["wall"],
                  "cpu_use": best[p]["cpu"] / (cores * best[p]["wall"]), "best": best[p]["best"],
                  "best_gap": whole["best"] - best[p]["best"]}
    print(f"\nOptuna search, {trials} trials, {workers} workers on {cores} cores (hparams_search=optuna; "
          f"best of {rounds} round{'s' if rounds > 1 else ''}). Goals: wall ratio <= {GOALS['wall_ratio']} "
          f"with the best within {GOALS['best_gap']} of the unpruned search's; CPU use >= {GOALS['cpu_use']}")
    print("| hydra.sweeper.pruner | wall time | / unpruned | CPU time / (cores x wall) | best cv/balanced_accuracy "
          "| below unpruned's | trials |\n|---|---|---|---|---|---|---|")
    for p in PRUNERS:
        o = out[p]
        print(f"| {p} | {o['wall']:.1f} s | {o['wall_ratio']:.2f} | {o['cpu_use']:.2f} | {o['best']:.4f} "
              f"| {o['best_gap']:+.4f} | {_states(best[p]['states'])} |")
    return out


def _states(states: dict) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(states.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    report(args.trials, args.workers, args.rounds)


if __name__ == "__main__":
    main()
