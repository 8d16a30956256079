"""Sweeps that resume: a job identical to a FINISHED run (config, clean commit, data) is not
trained again, and an interrupted Optuna search rerun finishes the same study.

Reuse needs a clean git tree, so each test works in a committed copy of this working tree
(its own code, not the last commit's) beside a temporary store."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import numpy as np
from conftest import REAL_TRAIN, make_images, needs_data, runs_of, write_h5

from pipeline.common import ROOT

pytestmark = needs_data


@pytest.fixture
def project(tmp_path):
    """A clean, committed copy of the working tree with the data in place."""
    work = tmp_path / "project"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / name)
    shutil.copytree(REAL_TRAIN.parent, work / "data" / "raw")
    git = ["git", "-c", "user.email=test@catnet", "-c", "user.name=test"]
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run(["git", "add", "-A"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=work, check=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs_of(uri)  # the store's tables exist before any process polls them
    return {"dir": work, "uri": uri, "git": git, "tmp": tmp_path}


def sweep(project, *args, popen=False, env=None):
    env = {**os.environ, **(env or {}), "PYTHONPATH": f"{project['dir'] / 'src'}{os.pathsep}{project['dir']}"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "pipeline", "-m", *args, f"tracking.uri={project['uri']}",
           "tracking.experiment=test"]
    if popen:  # its log line by line, as written
        return subprocess.Popen(cmd, cwd=project["dir"], env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=project["dir"], env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return log, time.perf_counter() - start


def counts(log: str) -> tuple[int, int]:
    """(trained, reused) from the sweep's summary line."""
    m = re.search(r"sweep: \d+ jobs, \d+ finished, \d+ failed, \d+ diverged, \d+ pruned; (\d+) trained, (\d+) reused", log)
    assert m, log[-2000:]
    return int(m.group(1)), int(m.group(2))


def trained_runs(uri: str, runs: list | None = None) -> list:
    """Runs that trained a network: FINISHED, neither a sweep parent nor a link to a reused run."""
    runs = runs_of(uri)[1] if runs is None else runs
    return [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("catnet.sweep") != "parent"
            and "catnet.reused_from" not in r.data.tags]


@pytest.mark.slow
def test_a_sweep_run_twice_trains_each_job_once(project):
    jobs = ["seed=0,1,2,3", "train.epochs=300", "train.check_learned=false"]
    first, first_s = sweep(project, *jobs)
    assert counts(first) == (4, 0)
    second, second_s = sweep(project, *jobs)
    assert counts(second) == (0, 4) and second.count("reused ") >= 4
    # nothing trained the second time (the time it saves is make bench's to measure: a job of the
    # default network now trains in a small part of its whole cost, so a wall-time ratio is noise)
    assert first.count("] - train: 300 epochs") == 4 and "] - train: " not in second
    print(f"4-job sweep: first {first_s:.1f} s, rerun {second_s:.1f} s ({second_s / first_s:.2f}x)")
    assert len(trained_runs(project["uri"])) == 4

    client, runs = runs_of(project["uri"])
    parents = sorted((r for r in runs if r.data.tags.get("catnet.sweep") == "parent"), key=lambda r: r.info.start_time)
    links = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id]
    originals = {r.info.run_id: r for r in trained_runs(project["uri"])}
    assert len(links) == 4 and {r.data.tags["catnet.reused_from"] for r in links} == set(originals)
    for link in links:  # a link carries what the run it stands for recorded, and its model if it has one
        original = originals[link.data.tags["catnet.reused_from"]]
        assert link.data.metrics["train/accuracy"] == original.data.metrics["train/accuracy"]
        assert link.data.params["seed"] == original.data.params["seed"]
        assert link.data.tags.get("catnet.model_uri") == original.data.tags.get("catnet.model_uri")
    assert parents[1].data.metrics["sweep/reused"] == 4 and parents[1].data.metrics["sweep/trained"] == 0
    assert parents[1].data.tags["catnet.best_run_id"] in originals  # the run that trained, with the model
    env = {**os.environ, "PYTHONPATH": f"{project['dir'] / 'src'}{os.pathsep}{project['dir']}"}
    shown = subprocess.run([sys.executable, "-m", "pipeline.compare", "experiment=test", f"parent={parents[1].info.run_id}",
                            f"tracking.uri={project['uri']}", f"out_dir={project['tmp'] / 'sweep2'}"],
                           cwd=project["dir"], env=env, check=True, capture_output=True, text=True)
    assert shown.stdout.count("#") >= 4  # the sweep's comparison lists its 4 jobs
    for link in links:  # and its curves are those of the runs that trained (300 epochs, not 1 point)
        origin = client.get_metric_history(link.data.tags["catnet.reused_from"], "train/error")
        assert len(origin) == 300 and len(client.get_metric_history(link.info.run_id, "train/error")) == 1

    assert counts(sweep(project, "seed=0,1,2,3,4", *jobs[1:])[0]) == (1, 4)  # a fifth value trains one
    assert counts(sweep(project, "seed=0,1", "train.epochs=301", *jobs[2:])[0]) == (2, 0)  # another config
    assert counts(sweep(project, "seed=0,1", *jobs[1:], "sweep.reuse=false")[0]) == (2, 0)  # reuse off
    metrics = project["dir"] / "src/catnet/metrics.py"
    metrics.write_text(metrics.read_text() + "\n# a change\n")
    assert counts(sweep(project, "seed=0,1", *jobs[1:])[0]) == (2, 0)  # a dirty tree
    subprocess.run([*project["git"], "commit", "-qam", "change"], cwd=project["dir"], check=True)
    assert counts(sweep(project, "seed=0,1", *jobs[1:])[0]) == (2, 0)  # committed: another commit
    assert counts(sweep(project, "seed=0,1", *jobs[1:])[0]) == (0, 2)  # and now that commit's runs

    # the experiment-wide comparison lists each trained run once, not its links
    subprocess.run([sys.executable, "-m", "pipeline.compare", "experiment=test", f"tracking.uri={project['uri']}",
                    f"out_dir={project['tmp'] / 'compare'}"], cwd=project["dir"], env=env, check=True,
                   capture_output=True)
    rows = (project["tmp"] / "compare/runs.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == len(trained_runs(project["uri"])) == 4 + 1 + 2 + 2 + 2 + 2


def test_a_job_identical_to_the_one_before_it_is_reused(project):
    """seed=0,0,0: the second and third jobs find the first's FINISHED run and reuse it instead of
    training again."""
    log, _ = sweep(project, "seed=0,0,0", "train.epochs=200", "train.check_learned=false")
    assert counts(log) == (1, 2), log[-3000:]
    assert log.count("] - train: 200 epochs") == 1
    trained = trained_runs(project["uri"])
    assert len(trained) == 1 and len(runs_of(project["uri"])[0].get_metric_history(trained[0].info.run_id,
                                                                                    "train/error")) == 200


@pytest.mark.slow
def test_an_optuna_trial_identical_to_a_finished_run_is_linked_not_trained(project):
    """A second study with the same sampler seed proposes the first study's trials again: each is
    identical to a FINISHED run, so it is linked (with its own trial's tags) instead of trained."""
    search = ["hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1", "hydra/launcher=basic",
              "train.epochs=20", "train.check_learned=false", "data.cv_folds=2", "data.cv_repeats=1",
              f"hydra.sweeper.storage={project['tmp'] / 'study.log'}", "hydra.sweeper.pruner=none"]
    log, _ = sweep(project, *search)
    assert counts(log) == (3, 0)
    log, _ = sweep(project, *search, "hydra.sweeper.study_name=again")
    assert counts(log) == (0, 3), log[-3000:]
    _, runs = runs_of(project["uri"])
    links = [r for r in runs if "catnet.reused_from" in r.data.tags]
    assert sorted((r.data.tags["optuna.study"], r.data.tags["optuna.trial"]) for r in links) == [
        ("again", "0"), ("again", "1"), ("again", "2")]
    assert len(trained_runs(project["uri"], runs)) == 3


def test_compare_draws_a_reused_jobs_curve_from_the_run_that_trained():
    import math

    from pipeline.compare import _trained_by

    assert _trained_by({"run_id": "link", "tags.catnet.reused_from": "origin"}) == "origin"
    assert _trained_by({"run_id": "run", "tags.catnet.reused_from": math.nan}) == "run"
    assert _trained_by({"run_id": "run"}) == "run"


@pytest.mark.slow
def test_a_job_whose_data_changed_trains_again(project):
    """The data is part of a job's identity: the same config and commit on other data (the same
    files rewritten) trains again; on the same data again, it is reused."""
    rng = np.random.default_rng(0)
    files = [project["tmp"] / "train.h5", project["tmp"] / "test.h5"]
    args = ["seed=0", "train.epochs=20", "train.check_learned=false",
            f"data.train_path={files[0]}", f"data.test_path={files[1]}"]

    def write_data(shift: int) -> None:
        for path, n, split in zip(files, (40, 12), ("train", "test")):
            x, y = make_images(n, rng)
            write_h5(path, x // 2 + shift, y, split)

    write_data(0)
    assert counts(sweep(project, *args)[0]) == (1, 0)
    write_data(60)  # other pixels in the same files
    assert counts(sweep(project, *args)[0]) == (1, 0)
    assert counts(sweep(project, *args)[0]) == (0, 1)  # unchanged now: reused


NOT_REUSED = "no job is reused from an earlier run"


@pytest.mark.slow
def test_what_the_pipeline_and_dvc_write_leaves_a_run_clean_a_changed_config_file_does_not(project):
    """``dvc exp run -S`` rewrites params.yaml, dvc.lock and the committed stage outputs: runs after
    it are still of a clean commit and reused. A new or changed file of conf/ or the code makes
    them dirty, and the sweep says once why it reuses nothing."""
    args = ["seed=0", "train.epochs=20", "train.check_learned=false"]
    log, _ = sweep(project, *args)
    assert counts(log) == (1, 0) and NOT_REUSED not in log
    work = project["dir"]
    for name in ("params.yaml", "dvc.lock", "reports/train_history.csv"):  # what DVC rewrites
        (work / name).write_text((work / name).read_text().replace("0", "1"))
    log, _ = sweep(project, *args)
    assert counts(log) == (0, 1) and NOT_REUSED not in log, log[-2000:]
    (work / "conf/model/wide.yaml").write_text("hidden_sizes: [64, 16]\n")  # a config no commit holds
    log, _ = sweep(project, "seed=0,1", *args[1:])
    assert counts(log) == (2, 0)
    assert log.count(NOT_REUSED) == 1 and "(conf/model/wide.yaml)" in log, log[-2000:]
    _, runs = runs_of(project["uri"])
    assert sorted(r.data.tags.get("catnet.git.dirty") for r in trained_runs(project["uri"], runs)) == [
        "False", "True", "True"]


@pytest.mark.slow
def test_runs_that_differ_only_in_their_blas_are_not_linked(project):
    """The BLAS's thread count (like its kernel) changes how a sum rounds: the same config, commit
    and data on 2 BLAS threads is another identity than on 1, so the sweep trains it instead of
    linking it to the run of 1 thread; on 2 threads again, that run is reused."""
    args = ["seed=0", "train.epochs=20", "train.check_learned=false"]
    assert counts(sweep(project, *args)[0]) == (1, 0)
    two = {"OPENBLAS_NUM_THREADS": "2"}
    assert counts(sweep(project, *args, env=two)[0]) == (1, 0)
    assert counts(sweep(project, *args, env=two)[0]) == (0, 1)
    client, runs = runs_of(project["uri"])
    trained = sorted(trained_runs(project["uri"], runs), key=lambda r: r.info.start_time)
    assert [r.data.tags["catnet.blas"].rsplit(" ", 2)[-2] for r in trained] == ["1", "2"]
    assert trained[0].data.tags["catnet.identity"] != trained[1].data.tags["catnet.identity"]
    weights = [np.load(client.download_artifacts(r.info.run_id, "weights.npz", str(project["tmp"] / r.info.run_id)))
               for r in trained]
    differ = any(weights[0][k].tobytes() != weights[1][k].tobytes() for k in weights[0].files)
    print(f"{trained[0].data.tags['catnet.blas']} vs 2 threads: the weights' bits {'differ' if differ else 'agree'}")
