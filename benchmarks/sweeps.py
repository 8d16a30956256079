"""What a sweep user waits for: whole commands, process start to exit, tracked and untracked.

    python -m benchmarks.sweeps                 # the table of issue #13, two rounds
    python -m benchmarks.sweeps --rounds 1 --jobs 4 --long-epochs 2000   # a quick look

Each figure is the wall time of a real command (``python -m pipeline ...`` in a fresh process,
into one SQLite store made before the timing, as a user's exists, an experiment per command,
``sweep.reuse=false`` so that every job trains), the best
of the rounds; tracked and untracked commands alternate within a round, so that their ratios
come from the same minutes of the same machine. "Per extra job" is (T(N jobs) - T(1 job)) / (N - 1)
of a sequential multirun of the default network: what one more job of a sweep costs. Each
command also runs through ``benchmarks/floor.py`` (the same Hydra config, a task that trains and
records nothing of its own): what Hydra and MLflow cost before catnet does anything. The tracked
figures are measured twice: into a fresh store, and into a store that has lived (``--lived-runs``
FINISHED runs of 1,000 epochs each in the experiment the commands write to, made untimed through
MLflow's client): the cost of a run must not grow with the store.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GOALS = {  # issue #36, seconds or ratios on the 2-core development machine
    "per_job_on": 0.35, "per_job_off": 0.12, "one_on": 3.0, "one_off": 1.0, "sweep_ratio": 2.0, "joblib_ratio": 0.65,
}


FLOOR = "benchmarks.floor"  # the same commands with a task that trains and records nothing of its own
STORE = [Path(tempfile.mkdtemp(prefix="catnet-bench-")) / "mlflow.db"]  # made once (untimed), as a user's is
EXPERIMENT: list[str] = []  # the lived store's experiment, which every command writes to; else one each
COUNT = [0]


def wall(*args: str, tracked: bool, module: str = "pipeline") -> float:
    """Seconds of ``python -m <module> <args>`` from process start to exit (which must be 0),
    into the benchmark's store, each command in an experiment of its own (or the lived one's)."""
    COUNT[0] += 1
    if module == FLOOR:
        args = (*args, "~hydra.callbacks.mlflow_sweep")  # no sweep parent run: the floor has none
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", module, *args, f"tracking.enabled={str(tracked).lower()}",
               f"tracking.uri=sqlite:///{STORE[0]}", f"tracking.experiment={(EXPERIMENT or [f'bench-{COUNT[0]}'])[0]}",
               "sweep.reuse=false"]
        if "-m" in args:
            cmd.append(f"hydra.sweep.dir={tmp}/sweep")
        else:
            cmd.append(f"paths.out_dir={tmp}/out")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"benchmark command failed ({' '.join(cmd[1:])}):\n{proc.stderr[-2000:]}")
    return took


def measure(rounds: int, jobs: int, long_epochs: int) -> dict[str, float]:
    seeds = f"seed=range(0,{jobs})"
    commands = {
        "one": (),
        "sweep1": ("-m", "seed=0"),
        "sweepN": ("-m", seeds),
    }
    best: dict[str, float] = {}
    wall("train.epochs=1", "train.check_learned=false", tracked=True)  # creates the store's tables
    for _ in range(rounds):
        for name, args in commands.items():
            for tracked in (True, False):
                for module, prefix in (("pipeline", ""), (FLOOR, "floor_")):
                    key = f"{prefix}{name}_{'on' if tracked else 'off'}"
                    best[key] = min(best.get(key, float("inf")), wall(*args, tracked=tracked, module=module))
        long = ("-m", seeds, f"train.epochs={long_epochs}")
        best["long_seq"] = min(best.get("long_seq", float("inf")), wall(*long, tracked=True))
        best["long_joblib"] = min(best.get("long_joblib", float("inf")),
                                  wall(*long, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", tracked=True))
    return best


def live(runs: int, epochs: int = 1000) -> None:
    """A new store whose experiment ``lived`` holds ``runs`` FINISHED runs of ``epochs`` points of
    train/error each, with a run's params and final metrics; the commands then write there."""
    import mlflow
    from mlflow.entities import Metric, Param

    STORE[0] = Path(tempfile.mkdtemp(prefix="catnet-lived-")) / "mlflow.db"
    EXPERIMENT[:] = ["lived"]
    client = mlflow.MlflowClient(f"sqlite:///{STORE[0]}")
    experiment = client.create_experiment("lived", artifact_location=(STORE[0].parent / "artifacts").as_uri())
    start = time.perf_counter()
    for i in range(runs):
        run = client.create_run(experiment, run_name=f"lived-{i}").info.run_id
        now = int(time.time() * 1000)
        client.log_batch(run, params=[Param("seed", str(i)), Param("train.lr", "0.005")],
                         metrics=[Metric("train/error", 1.0 / e, now, e) for e in range(1, epochs + 1)]
                         + [Metric("test/accuracy", 0.7, now, 0), Metric("train/balanced_accuracy", 0.9, now, 0)])
        client.set_terminated(run)
    print(f"lived store: {runs} runs of {epochs} epochs made in {time.perf_counter() - start:.0f} s")


def report(rounds: int = 2, jobs: int = 16, long_epochs: int = 20000, lived: int = 0) -> dict[str, float]:
    if lived:
        live(lived)
    t = measure(rounds, jobs, long_epochs)
    per = {f"{p}{m}": (t[f"{p}sweepN_{m}"] - t[f"{p}sweep1_{m}"]) / (jobs - 1)
           for m in ("on", "off") for p in ("", "floor_")}
    ratio = t["sweepN_on"] / t["sweepN_off"]
    joblib = t["long_joblib"] / t["long_seq"]
    rows = [
        ("per extra job, sequential sweep (s)", per["on"], per["off"], per["floor_on"], per["floor_off"],
         f"<= {GOALS['per_job_on']} / {GOALS['per_job_off']}"),
        ("one run, python -m pipeline (s)", t["one_on"], t["one_off"], t["floor_one_on"], t["floor_one_off"],
         f"<= {GOALS['one_on']} / {GOALS['one_off']}"),
        (f"{jobs}-job sequential sweep (s)", t["sweepN_on"], t["sweepN_off"], t["floor_sweepN_on"],
         t["floor_sweepN_off"], f"tracked/untracked <= {GOALS['sweep_ratio']}"),
    ]
    where = f"a store holding {lived} runs of 1000 epochs" if lived else "a fresh SQLite store"
    print(f"\nsweeps: whole commands, process start to exit, best of {rounds} round(s); {where}.")
    print("floor: the same commands through benchmarks/floor.py, a Hydra app over conf/ that trains nothing")
    print("and makes the least MLflow record (params, one metric's 1000 points, status): the frameworks' cost")
    print(f"{'':40} {'tracked':>8} {'untracked':>9} {'floor on':>9} {'floor off':>9}  goal")
    for label, on, off, floor_on, floor_off, goal in rows:
        print(f"{label:40} {on:8.2f} {off:9.2f} {floor_on:9.2f} {floor_off:9.2f}  {goal}")
    print(f"{'tracked / untracked, ' + str(jobs) + '-job sweep':40} {ratio:8.3f} {'':9} "
          f"{t['floor_sweepN_on'] / t['floor_sweepN_off']:9.3f}")
    print(f"{jobs} jobs x {long_epochs} epochs, tracked: sequential {t['long_seq']:.2f} s, joblib n_jobs=2 "
          f"{t['long_joblib']:.2f} s, ratio {joblib:.3f} (goal <= {GOALS['joblib_ratio']})")
    return {**t, "per_job_on": per["on"], "per_job_off": per["off"], "floor_per_job_on": per["floor_on"],
            "floor_per_job_off": per["floor_off"], "sweep_ratio": ratio, "joblib_ratio": joblib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--long-epochs", type=int, default=20000)
    parser.add_argument("--lived-runs", type=int, default=0, help="measure into a store holding this many runs")
    args = parser.parse_args()
    report(args.rounds, args.jobs, args.long_epochs, args.lived_runs)


if __name__ == "__main__":
    main()
