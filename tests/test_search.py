"""The Optuna search (hydra_plugins/catnet_sweeper/optuna_search.py) with its real storage, a
journal file: a study that outlives its process and continues when the command runs again, trials
that are pruned, diverge or fail told to Optuna as such and counted apart, and a new trial as
soon as a worker is free."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, needs_data, runs_of

from pipeline.common import ROOT

pytestmark = needs_data

# short trials: 2 folds, 1 repeat
QUICK = ("preset=best", "train.check_learned=false", "data.cv_folds=2", "data.cv_repeats=1")


def optuna_study(storage: Path, name: str = "catnet"):
    import optuna

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(storage))))


def new_study(storage: Path, enqueued: list[dict], name: str = "catnet"):
    import optuna

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.create_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(storage))),
                                direction="maximize")
    for params in enqueued:
        study.enqueue_trial(params)
    return study


def command(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "-m", "hparams_search=optuna", "hydra.sweeper.params=null",
            f"hydra.sweeper.storage={tmp_path / 'study.log'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment=test", f"hydra.sweep.dir={tmp_path / 'multirun'}", *QUICK, *args]


def search(tmp_path: Path, *args: str, code: int = 0) -> str:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run(command(tmp_path, *args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == code, log[-3000:]
    return log


def children_of_last_parent(uri: str):
    _, runs = runs_of(uri)
    parents = sorted((r for r in runs if r.data.tags.get("catnet.sweep") == "parent"), key=lambda r: r.info.start_time)
    return parents[-1], [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[-1].info.run_id]


@pytest.mark.slow
def test_pruned_and_diverged_trials_are_results_told_to_optuna_and_counted_apart(tmp_path):
    """A good trial first (enqueued), then trials that cannot win are pruned after their first
    fold: KILLED runs tagged with the step, PRUNED in the study, counted apart; one that diverges
    is FAIL in the study, FAILED with its reason in MLflow; the search exits 0."""
    new_study(tmp_path / "study.log", [{"train.lr": 0.002}, {"train.lr": 1e-9}, {"train.lr": 1e-9},
                                       {"train.lr": 1.0}])
    log = search(tmp_path, "hydra.sweeper.n_trials=4", "train.lr=choice(0.002,0.000000001,1.0)",
                 "train.epochs=300", "hydra.sweeper.n_startup_trials=1",
                 "hydra.sweeper.n_warmup_steps=0", "hydra/launcher=basic")
    assert "sweep: 4 jobs, 1 finished, 0 failed, 1 diverged, 2 pruned" in log, log[-3000:]
    from optuna.trial import TrialState

    trials = optuna_study(tmp_path / "study.log").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED, TrialState.FAIL]
    assert trials[3].user_attrs.get("catnet.diverged") and "diverged" in trials[3].user_attrs["catnet.reason"]
    assert list(trials[1].intermediate_values) == [1]  # stopped after the first fold of two
    parent, children = children_of_last_parent(f"sqlite:///{tmp_path / 'mlflow.db'}")
    by_trial = {int(c.data.tags["optuna.trial"]): c for c in children}
    assert sorted(by_trial) == [0, 1, 2, 3] and all(c.data.tags["optuna.study"] == "catnet" for c in children)
    assert [by_trial[n].info.status for n in range(4)] == ["FINISHED", "KILLED", "KILLED", "FAILED"]
    assert by_trial[1].data.tags["catnet.pruned_step"] == "1" and "catnet.pruned_step" not in by_trial[0].data.tags
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/pruned"] == 2
    assert parent.data.params["sweep.study"] == "catnet"
    assert parent.data.params["sweep.storage"] == str(tmp_path / "study.log")
    # with pruning off, the same trials all run whole
    new_study(tmp_path / "study.log", [{"train.lr": 0.002}, {"train.lr": 1e-9}], name="unpruned")
    log = search(tmp_path, "hydra.sweeper.n_trials=2", "train.lr=choice(0.002,0.000000001)", "train.epochs=300",
                 "hydra.sweeper.study_name=unpruned", "hydra.sweeper.pruner=none", "hydra.sweeper.n_startup_trials=1",
                 "hydra.sweeper.n_warmup_steps=0", "hydra/launcher=basic")
    assert "sweep: 2 jobs, 2 finished, 0 failed, 0 diverged, 0 pruned" in log, log[-3000:]


def _run_until(tmp_path: Path, text: str, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """Start a search; return once its log says ``text``."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen(command(tmp_path, *args), cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            break
    return proc, lines


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "kill -9"])
def test_a_stopped_search_continues_its_study_when_run_again(tmp_path, how):
    """Stopped after 2 of 5 trials ended (one running): the rerun of the same command runs only
    what is missing; the trial that was running is FAIL in the study (marked by the rerun after
    kill -9), not counted, and its parameters run again; n_trials is the study's total."""
    args = ("hydra.sweeper.n_trials=5", "train.lr=tag(log,interval(0.0001,0.002))", "train.epochs=1500",
            "hydra/launcher=basic", "hydra.sweeper.pruner=none")
    proc, lines = _run_until(tmp_path, "'#2 lr=", *args)  # trial 2's run exists (trials 0 and 1 ended): it trains
    sent = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "kill -9": signal.SIGKILL}[how]
    os.kill(proc.pid, sent)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == {"SIGINT": 130, "SIGTERM": 143, "kill -9": -9}[how], out[-3000:]
    from optuna.trial import TrialState

    before = optuna_study(tmp_path / "study.log").trials
    assert [t.state for t in before[:2]] == [TrialState.COMPLETE] * 2, out[-3000:]
    stopped = before[2]
    assert stopped.state == (TrialState.RUNNING if how == "kill -9" else TrialState.FAIL)

    log = search(tmp_path, *args)
    assert "2 trials ended, 3 to run (n_trials=5)" in log, log[-3000:]
    assert "sweep: 3 jobs, 3 finished" in log
    after = optuna_study(tmp_path / "study.log").trials
    assert [t.state for t in after[:2]] == [TrialState.COMPLETE] * 2  # not run again
    assert after[2].state == TrialState.FAIL and after[2].user_attrs["catnet.interrupted"]
    counted = [t for t in after if t.state == TrialState.COMPLETE]
    assert len(counted) == 5 and len(after) == 6
    again = after[3]  # the stopped trial's parameters, proposed first
    assert again.params == stopped.params and again.user_attrs["catnet.retry_of"] == 2
    _, children = children_of_last_parent(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(int(c.data.tags["optuna.trial"]) for c in children) == [3, 4, 5]
    # and once the study has its n_trials, the command runs nothing
    log = search(tmp_path, *args)
    assert "5 trials ended, 0 to run (n_trials=5)" in log, log[-3000:]


@pytest.mark.slow
def test_a_new_trial_starts_as_soon_as_a_worker_is_free(tmp_path):
    """Two workers, a long trial and short ones: the short trials follow each other on one worker
    while the long one runs on the other (a batch sweeper would wait for the long one)."""
    new_study(tmp_path / "study.log", [{"train.epochs": 20}, {"train.epochs": 20000}, {"train.epochs": 20},
                                       {"train.epochs": 20}])
    log = search(tmp_path, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra.launcher.n_jobs=2",
                 "train.epochs=choice(20,20000)", "hydra.sweeper.pruner=none")
    events = [line.split("] ", 1)[1] for line in log.splitlines() if "Optuna: trial" in line]
    order = [e for e in events if e.startswith(("Optuna: trial 1 ended", "Optuna: trial 3:"))]
    assert order[0].startswith("Optuna: trial 3:"), events  # trial 3 started while trial 1 ran
    assert "sweep: 4 jobs, 4 finished" in log


@pytest.mark.slow
def test_the_dashboard_opens_the_study(tmp_path):
    """optuna-dashboard, the README's command, serves the search's study from its journal file."""
    import json

    search(tmp_path, "hydra.sweeper.n_trials=2", "train.epochs=20", "hydra/launcher=basic")
    port = free_port()
    dashboard = subprocess.Popen([str(Path(sys.executable).parent / "optuna-dashboard"), str(tmp_path / "study.log"),
                                  "--host", "127.0.0.1", "--port", str(port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    studies = json.load(r)["study_summaries"]
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("optuna-dashboard did not answer")
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)
    assert [(s["study_name"], s["directions"]) for s in studies] == [("catnet", ["maximize"])]


def test_a_bad_search_setting_is_refused_in_one_line_before_any_trial(tmp_path):
    log = search(tmp_path, "hydra.sweeper.pruner=sometimes", code=2)
    assert log.strip().splitlines()[-1] == ("catnet: error: hydra.sweeper.pruner='sometimes': must be one of "
                                            "median, hyperband, none")
    assert "Traceback" not in log and not (tmp_path / "study.log").exists()
    log = search(tmp_path, "hydra.sweeper.n_jobs=0", code=2)
    assert log.strip().splitlines()[-1] == "catnet: error: hydra.sweeper.n_jobs=0: must be a whole number of 1 or more"


@pytest.mark.slow
def test_a_search_on_joblib_stopped_by_sigterm_marks_its_running_trials_and_continues(tmp_path):
    """Two trials at a time in joblib's workers: SIGTERM stops the workers, marks the trials they ran
    FAIL (no trial left RUNNING, no job's traceback), and the rerun completes the study."""
    args = ("hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra.launcher.n_jobs=2",
            "train.lr=tag(log,interval(0.0001,0.002))", "train.epochs=1500", "hydra.sweeper.pruner=none")
    proc, lines = _run_until(tmp_path, " ended: ", *args)
    os.kill(proc.pid, signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and "Traceback" not in out, out[-3000:]
    from optuna.trial import TrialState

    trials = optuna_study(tmp_path / "study.log").trials
    assert TrialState.RUNNING not in [t.state for t in trials]
    stopped = [t for t in trials if t.user_attrs.get("catnet.interrupted")]
    assert stopped and all(t.state == TrialState.FAIL for t in stopped)
    _, runs = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert "RUNNING" not in [r.info.status for r in runs]
    log = search(tmp_path, *args)
    assert "sweep: " in log and len([t for t in optuna_study(tmp_path / "study.log").trials
                                     if t.state == TrialState.COMPLETE]) == 4
