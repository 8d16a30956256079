"""A sweep's record as each job writes it: what the store refuses fails that job, never silently;
a sweep stopped keeps what finished; a store that cannot be opened stops the sweep before any job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import needs_data, runs_of

from pipeline.common import ROOT


def _sweep(store, *args: str, epochs: int | str = 4000, seeds: str = "0,1,2,3") -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "pipeline", "-m", f"seed={seeds}", f"train.epochs={epochs}", "sweep.reuse=false",
           f"hydra.sweep.dir={store['out']}", *store["args"], *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _children(store) -> dict:
    _, runs = runs_of(store["uri"])
    return {r.data.tags["mlflow.runName"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def _said_counts(out: str) -> tuple[int, int]:
    import re

    said = re.search(r"sweep: 4 jobs, (\d+) finished, (\d+) failed", out)
    assert said, out[-3000:]
    return int(said[1]), int(said[2])


@pytest.mark.slow
@needs_data
def test_a_job_whose_points_the_store_refuses_is_failed_though_it_trained_(store):
    """The store refuses seed=1's points (a trigger of its own database): that job counts as
    failed, its run is FAILED with the store's words, the other three are FINISHED and the sweep
    exits 1."""
    import sqlite3

    runs_of(store["uri"])  # the store's tables
    db = sqlite3.connect(store["uri"][len("sqlite:///"):])
    db.execute("CREATE TRIGGER refuse_seed_1 BEFORE INSERT ON metrics WHEN NEW.run_uuid IN "
               "(SELECT run_uuid FROM params WHERE key = 'seed' AND value = '1') "
               "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    db.commit()
    db.close()
    proc = _sweep(store, epochs=300)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out[-3000:]
    assert _said_counts(out) == (3, 1), out[-3000:]
    status = {name: r.info.status for name, r in _children(store).items()}
    assert status == {"#0 seed=0": "FINISHED", "#1 seed=1": "FAILED", "#2 seed=2": "FINISHED",
                      "#3 seed=3": "FINISHED"}, out[-3000:]
    assert "refused by the test" in _children(store)["#1 seed=1"].data.tags["catnet.failure"]
    assert "catnet: error: sweep: 1 of 4 jobs failed" in out, out[-3000:]


@pytest.mark.slow
@needs_data
def test_a_sweep_stopped_after_a_job_ended_keeps_that_job_finished_and_kills_the_next(store):
    """SIGTERM as the second job starts: the first job's record is whole and its run stays
    FINISHED; the second is KILLED, as is the sweep."""

    runs_of(store["uri"])  # the store's tables
    proc = _sweep(store, epochs="300,3000000", seeds="0")  # job #1 trains until stopped
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "#1 : " in line:  # Hydra launches the second job
            proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out[-3000:]
    client, runs = runs_of(store["uri"])
    status = {r.data.tags["mlflow.runName"]: (r.info.status, r.data.tags.get("catnet.failure")) for r in runs}
    first = status.pop("#0 epochs=300")
    assert first == ("FINISHED", None), (first, out[-3000:])
    assert {s for s, _ in status.values()} == {"KILLED"}, status  # the sweep (and the second job, if it began)
    finished = next(r for r in runs if r.data.tags["mlflow.runName"] == "#0 epochs=300")
    assert len(client.get_metric_history(finished.info.run_id, "train/error")) == 300


@needs_data
def test_a_store_that_cannot_be_opened_fails_the_sweep_before_any_job_on_one_line(store):
    """The experiment is deleted: the sweep, which opens the store and creates its parent run
    before any job, exits 2 with the store's reason on one line, no job run, no traceback."""
    client, _ = runs_of(store["uri"])
    client.delete_experiment(client.create_experiment("gone"))
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "-m", "seed=0,1,2", "train.epochs=100",
                           "train.check_learned=false", f"hydra.sweep.dir={store['out']}", *store["args"][:1],
                           "tracking.experiment=gone"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "] - train:" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("catnet: error:")]
    assert len(errors) == 1 and "experiment='gone': this experiment is deleted" in errors[0], out[-3000:]
    assert "Traceback" not in out
    _, runs = runs_of(store["uri"], "gone")
    assert runs == []


def test_a_sweeps_counts_and_best_child_come_from_its_runs(tmp_path):
    """parent.finish reads the children in the store: a child left RUNNING is closed FAILED, a job
    whose return says it failed without a run gets a FAILED child (its name and params), results
    (diverged, pruned, reused) are counted apart; the best child is the best FINISHED one."""
    from hydra.core.utils import JobReturn, JobStatus
    from mlflow.entities import Metric, RunTag

    from pipeline import search
    from pipeline.tracking import parent

    client, _ = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("test")
    top = client.create_run(exp, run_name="sweep").info.run_id

    def child(name, status, metric=None, **tags):
        run = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": top, **tags}).info.run_id
        if metric is not None:
            client.log_batch(run, metrics=[Metric("val/balanced_accuracy", metric, 0, 0)],
                             tags=[RunTag("catnet.model_uri", f"models:/m-{name}")])
        if status:
            client.set_terminated(run, status)
        return run

    child("good", "FINISHED", 0.8)
    best = child("better", "FINISHED", 0.9)
    child("link", "FINISHED", 0.7, **{"catnet.reused_from": best})
    child("diverged", "FAILED", **{"catnet.diverged_epoch": "3"})
    child("pruned", "KILLED", **{"catnet.pruned_step": "2"})
    left = child("left", None)
    job = JobReturn(overrides=["seed=9"], status=JobStatus.COMPLETED)
    job.return_value = search.ended("failed", reason="ServerUnreachable: gone",
                                    job={"name": "#9 seed=9", "params": {"seed": "9"}, "tags": {}})
    result = parent.finish(client, top, [job], ["val/balanced_accuracy"], "maximize")
    assert result["counts"] == {"jobs": 7, "finished": 3, "failed": 2, "diverged": 1, "pruned": 1, "killed": 0,
                                "running": 0, "reused": 1}
    assert result["status"] == "FAILED" and result["reason"] == "2 of 7 jobs failed" and result["lost"] == []
    assert result["summary"]["best_run_id"] == best
    assert client.get_run(left).info.status == "FAILED"
    assert "its job ended; closed by the sweep" in client.get_run(left).data.tags["catnet.failure"]
    made = [r for r in parent.children(client, top) if r.info.run_name == "#9 seed=9"]
    assert [(r.info.status, r.data.params) for r in made] == [("FAILED", {"seed": "9"})]
    assert "recorded by the sweep" in made[0].data.tags["catnet.failure"]
    finished = client.get_run(top)
    assert finished.info.status == "FAILED" and finished.data.metrics["sweep/reused"] == 1
