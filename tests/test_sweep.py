"""Sweeps land as comparable MLflow runs: parent + children, comparison report, REST access."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, import_or_skip, needs_data, run_cli, runs_of

from pipeline.common import ROOT

pytestmark = needs_data

SWEEP = ["train.lr=0.001,0.005", "model.hidden_sizes=[20,7],[8,4]", "train.epochs=12", "train.check_learned=false", "data.val_fraction=0.2"]


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """A 4-job sweep on the joblib launcher, 2 jobs at a time, in a temporary store."""
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = run_cli("-m", *SWEEP, f"tracking.uri={uri}", "tracking.experiment=test",
                   "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp / 'multirun'}")
    return {"uri": uri, "tmp": tmp, "log": proc.stderr + proc.stdout}


def test_parallel_sweep_gives_one_parent_and_four_full_children(sweep_store):
    client, runs = runs_of(sweep_store["uri"])
    parents = [r for r in runs if r.data.tags.get("catnet.sweep") == "parent"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4 and len(runs) == 5
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    names = {c.info.run_name for c in children}
    assert names == {f"#{i} lr={lr} hidden={h}" for i, (lr, h) in enumerate(
        (lr, h) for lr in ("0.001", "0.005") for h in ("[20,7]", "[8,4]"))}
    for c in children:
        for key in ("train/error", "val/error"):
            assert sorted(m.step for m in client.get_metric_history(c.info.run_id, key)) == list(range(1, 13))
        assert "val/accuracy" in c.data.metrics
    assert parent.data.params["sweep.launcher"] == "JoblibLauncher"
    # joblib's workers were started once the parent run existed: they inherit its id (the one way a
    # job learns it) and ran every job as the parent's child
    assert len({c.data.tags["catnet.pid"] for c in children}) == 2
    assert all(float(c.data.tags["catnet.pid_started"]) * 1000 > parent.info.start_time for c in children)
    assert parent.data.params["sweep.overrides"].startswith("train.lr=0.001,0.005")
    assert parent.data.metrics["sweep/jobs"] == 4
    best = max(children, key=lambda c: (c.data.metrics["val/balanced_accuracy"], -c.data.metrics["val/final_error"]))
    assert parent.data.tags["catnet.best_run_id"] == best.info.run_id
    assert parent.data.tags["catnet.best_by"] == "val/balanced_accuracy"
    assert parent.data.params["sweep.objective"] == "val/balanced_accuracy (maximize)"
    # the parent's name tells it apart in the runs table: the search, what it varies, what it fixes, the count
    assert parent.info.run_name == "grid lr×hidden epochs=12 check_learned=false val_fraction=0.2 joblib (4)"
    assert parent.data.tags["mlflow.note.content"].startswith("grid sweep of 4 jobs: python -m pipeline -m train.lr=")
    # every child logs its weights and normalizer, and has its model, loadable as runs:/<id>/model
    import mlflow
    import numpy as np

    mlflow.set_tracking_uri(sweep_store["uri"])
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    for c in children:
        assert "weights.npz" in {a.path for a in client.list_artifacts(c.info.run_id)}
        assert c.data.tags["catnet.model_uri"].startswith("models:/m-")
        model = mlflow.pyfunc.load_model(f"runs:/{c.info.run_id}/model")
        assert model.metadata.run_id == c.info.run_id
        with np.load(client.download_artifacts(c.info.run_id, "weights.npz", str(sweep_store["tmp"] / c.info.run_id)),
                     allow_pickle=False) as w:  # the model is this child's network, not another's
            assert w["W1"].shape[1] == (20 if "[20,7]" in c.info.run_name else 8)
        assert model.predict(images)["probability"].between(0, 1).all()
    assert len({c.data.tags["catnet.model_uri"] for c in children}) == 4


@pytest.mark.slow
def test_register_picks_by_rank_or_takes_the_run_the_user_chose(sweep_store, tmp_path):
    """register picks the best child by a metric (either direction), or registers the run named by
    ``run_id`` (whole, or the 8 characters compare prints); each version is that run's model, which
    predicts from image files, as does ``runs:/<8 characters>/model``."""
    import h5py
    from conftest import REAL_TEST
    from PIL import Image

    uri = sweep_store["uri"]
    with h5py.File(REAL_TEST) as f:
        for i in range(4):
            Image.fromarray(f["test_set_x"][i]).save(tmp_path / f"{i}.png")
    images = f"images=[{','.join(str(tmp_path / f'{i}.png') for i in range(4))}]"
    picked = {}
    for direction in ("minimize", "maximize"):  # one of the two is not the sweep's best
        reg = run_cli(f"tracking.uri={uri}", "experiment=test", "metric=train/final_error", f"direction={direction}",
                      "name=by-error", f"alias={direction}", module="pipeline.register")
        picked[direction] = reg.stdout.split(" = run ")[1].split()[0]
        pred = run_cli(f"model_uri=models:/by-error@{direction}", images, f"tracking.uri={uri}",
                       module="pipeline.predict")
        assert len(pred.stdout.strip().splitlines()) == 4
    client, runs = runs_of(uri)
    by_id = {r.info.run_id: r for r in runs}
    assert picked["minimize"] != picked["maximize"]
    chosen = next(r.info.run_id for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.run_id not in picked.values())
    reg = run_cli(f"tracking.uri={uri}", f"run_id={chosen[:8]}", "name=chosen", "alias=mine", module="pipeline.register")
    assert f"= run {chosen} (chosen by run_id)" in reg.stdout
    pred = run_cli(f"model_uri=runs:/{chosen[:8]}/model", images, f"tracking.uri={uri}", module="pipeline.predict")
    assert len(pred.stdout.strip().splitlines()) == 4
    from mlflow import MlflowClient

    version = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("chosen", "mine")
    assert version.run_id == chosen and version.source == by_id[chosen].data.tags["catnet.model_uri"]
    for given, says in (("0123abc", "give a run's id, or at least its first 8 characters"),
                        ("0123abcd", "no run in ")):
        bad = run_cli(f"tracking.uri={uri}", f"run_id={given}", module="pipeline.register", check=False)
        assert bad.returncode == 2 and bad.stderr.startswith(f"catnet: error: run_id={given}: {says}"), bad.stderr


def test_compare_report_lists_the_sweep_and_logs_to_its_parent(sweep_store):
    client, runs = runs_of(sweep_store["uri"])
    parent = next(r for r in runs if r.data.tags.get("catnet.sweep") == "parent")
    out = sweep_store["tmp"] / "compare"
    proc = run_cli(f"tracking.uri={sweep_store['uri']}", "experiment=test", f"parent={parent.info.run_id[:8]}",
                   f"out_dir={out}", module="pipeline.compare")
    import pandas as pd

    table = pd.read_csv(out / "runs.csv")
    assert len(table) == 4
    assert {"train.lr", "model.hidden_sizes", "val/balanced_accuracy", "test/accuracy"} <= set(table.columns)
    assert "train.epochs" not in table.columns  # the same in every run
    objective = table["val/balanced_accuracy"].tolist()
    assert objective == sorted(objective, reverse=True)
    assert "| run_id" in proc.stdout
    assert (out / "error_curves.png").stat().st_size > 10_000
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "compare")} == {
        "compare/runs.md", "compare/runs.csv", "compare/error_curves.png"}


def _get(url: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


@pytest.mark.slow
def test_mlflow_server_serves_the_sweep_over_rest(sweep_store):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sweep_store["uri"],
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        for _ in range(120):
            try:
                exp = _get(f"{base}/experiments/get-by-name?experiment_name=test")["experiment"]
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer within 60 s")
        runs = _get(f"{base}/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        assert len(runs) == 5
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parent_id = next(r["info"]["run_id"] for r, t in zip(runs, tags) if t.get("catnet.sweep") == "parent")
        children = [r for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent_id]
        assert len(children) == 4
        for child in children:
            params = {p["key"]: p["value"] for p in child["data"]["params"]}
            assert params["train.epochs"] == "12" and params["model.hidden_sizes"] in ("[20, 7]", "[8, 4]")
            rid = child["info"]["run_id"]
            history = _get(f"{base}/metrics/get-history?run_id={rid}&metric_key=train/error")["metrics"]
            assert sorted(m["step"] for m in history) == list(range(1, 13))
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_a_bad_job_fails_alone_and_the_sweep_goes_on(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli("-m", "train.lr=0.005,-1", "train.epochs=3", "train.check_learned=false", f"tracking.uri={uri}",
                   "tracking.experiment=test", f"hydra.sweep.dir={tmp_path / 'multirun'}", check=False)
    assert proc.returncode == 1  # the sweep went on, and says that a job failed
    client, runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags.get("catnet.sweep") == "parent")
    assert parent.info.status == "FAILED" and parent.data.metrics["sweep/finished"] == 1
    assert [r.info.run_name for r in runs if r.info.status == "FINISHED" and r is not parent] == ["#0 lr=0.005"]
    assert [r.info.run_name for r in runs if r.info.status == "FAILED" and r is not parent] == ["#1 lr=-1"]


@pytest.mark.slow
def test_a_job_that_diverges_is_a_result_counted_apart_not_a_failed_sweep(tmp_path):
    """A configuration whose training diverges (or learns nothing) is what a search finds out: its
    run is FAILED with the reason, the sweep counts it as diverged, apart from failed, and exits 0;
    a bad value beside it still fails the sweep."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["train.epochs=100", f"tracking.uri={uri}", "tracking.experiment=test"]
    proc = run_cli("-m", "train.lr=0.005,1e10", *common, f"hydra.sweep.dir={tmp_path / 'a'}", check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "sweep: 2 jobs, 1 finished, 0 failed, 1 diverged" in log, log[-3000:]
    _, runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags.get("catnet.sweep") == "parent")
    assert parent.info.status == "FINISHED"
    assert (parent.data.metrics["sweep/failed"], parent.data.metrics["sweep/diverged"]) == (0, 1)
    diverged = next((r for r in runs if r.info.run_name == "#1 lr=1e+10"), None)
    assert diverged is not None, [r.info.run_name for r in runs]
    assert diverged.info.status == "FAILED" and "TrainingDiverged" in diverged.data.tags["catnet.failure"]

    proc = run_cli("-m", "train.lr=1e10,-1", *common, f"hydra.sweep.dir={tmp_path / 'b'}", check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "sweep: 2 jobs, 0 finished, 1 failed, 1 diverged" in log, log[-3000:]


@pytest.mark.slow
def test_a_sweep_reads_its_data_once_per_process_and_anew_when_the_data_config_changes(tmp_path):
    """Four jobs in one process, two data configs: the files are read and checked twice, each
    job records the digest of its own splits (the same as a single run of that config), and no
    job's folder is left without what its run needs (its weights)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli("-m", "data.val_fraction=0.2,0.3", "seed=0,1", "train.epochs=3", "train.check_learned=false",
                   f"tracking.uri={uri}", "tracking.experiment=test", f"hydra.sweep.dir={tmp_path / 'multirun'}")
    log = proc.stdout + proc.stderr
    assert log.count("load: 1") + log.count("load: 2") == 2, log[-3000:]  # "load: 167 train images ..."
    assert log.count("load: the splits an earlier job of this process read") == 2
    run_cli("data.val_fraction=0.3", "train.epochs=3", "train.check_learned=false", f"tracking.uri={uri}",
            "tracking.experiment=single", f"paths.out_dir={tmp_path / 'single'}")
    _, runs = runs_of(uri)
    digests = {}
    for r in runs:
        if "mlflow.parentRunId" in r.data.tags:
            digests.setdefault(r.data.params["data.val_fraction"], set()).add(r.data.tags["catnet.data.md5"])
    _, (single,) = runs_of(uri, "single")
    assert len(digests["0.2"]) == len(digests["0.3"]) == 1 and digests["0.2"] != digests["0.3"]
    assert digests["0.3"] == {single.data.tags["catnet.data.md5"]}
    assert len(list((tmp_path / "multirun").glob("*/models/weights.npz"))) == 4


@pytest.mark.slow
def test_a_sweeps_jobs_share_their_inputs_and_train_what_each_would_train_alone(tmp_path):
    """Jobs of one process train on the inputs an earlier job made (pipeline/normalize.py:
    KeptInputs; catnet.train keeps their Gram matrix), made anew when the normalizer or the
    data changes. Six jobs: split 0 with scale, standardize, standardize again; then split 1 the
    same. Each job's weights and metrics are, to the bit, those of the same job run by a sweep
    process of its own."""
    common = ["train.epochs=40", "train.check_learned=false", "data.val_fraction=0.2", "tracking.enabled=false"]
    run_cli("-m", "data.split_seed=0,1", "normalize=scale,standardize,standardize", *common,
            f"hydra.sweep.dir={tmp_path / 'together'}")
    alone = {}
    for job in range(6):
        together = tmp_path / "together" / str(job)
        split, norm = job // 3, ("scale", "standardize", "standardize")[job % 3]
        assert f"data.split_seed={split}" in (together / ".hydra" / "overrides.yaml").read_text()
        if (split, norm) not in alone:
            alone[split, norm] = tmp_path / f"alone-{split}-{norm}"
            run_cli("-m", f"data.split_seed={split}", f"normalize={norm}", *common,
                    f"hydra.sweep.dir={alone[split, norm]}")
        for output in ("models/weights.npz", "reports/metrics.json"):
            assert (together / output).read_bytes() == (alone[split, norm] / "0" / output).read_bytes(), (job, output)


@pytest.mark.parametrize("knob", ["sweep.fallback=test/accuracy", "sweep.objective=test/balanced_accuracy",
                                  "sweep.direction=up"])
def test_a_sweep_that_would_rank_on_test_is_refused_before_any_job(tmp_path, knob):
    """Refused once, in one line, exit 2, before the store or any job exists (a Hydra callback's
    exception would only be a warning, and every job would fail on its own)."""
    db = tmp_path / "mlflow.db"
    proc = run_cli("-m", "seed=0,1", knob, "train.epochs=3", f"tracking.uri=sqlite:///{db}",
                   f"hydra.sweep.dir={tmp_path / 'multirun'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"catnet: error: {knob.split('=')[0]}=")
    assert "Traceback" not in proc.stderr and "#0" not in proc.stderr + proc.stdout
    assert not db.exists()


def test_a_sweep_whose_tracking_server_does_not_answer_is_refused_before_any_job(tmp_path):
    """Not a job waiting tracking.retry_seconds for a server that never answered: exit 2, one line."""
    uri = f"http://127.0.0.1:{free_port()}"
    proc = run_cli("-m", "seed=0,1", "train.epochs=3", f"tracking.uri={uri}",
                   f"hydra.sweep.dir={tmp_path / 'multirun'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"catnet: error: tracking.uri={uri}: no MLflow server")
    assert "#0" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("address", ["ray://10.1.2.3:10001", "head.example.org:6379"])
@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/mlflow.db", "http://127.0.0.1:5999"])
def test_a_remote_ray_cluster_with_a_store_only_this_host_reaches_is_refused(tmp_path, address, uri):
    """Refused in one line before any job, not discovered as lost runs on the cluster's nodes."""
    import_or_skip("ray", reason="the cluster extra is not installed (make setup-cluster)")
    proc = run_cli("-m", "seed=0,1", "hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={address}",
                   f"tracking.uri={uri.format(tmp=tmp_path)}", f"hydra.sweep.dir={tmp_path / 'multirun'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("catnet: error: tracking.uri=") and address in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_launcher_whose_engine_is_missing_is_refused_before_any_run(tmp_path):
    """SLURM's sbatch not on PATH, or a Ray cluster address where nothing answers (given, or ``auto``
    with no cluster or a stale one): exit 2 with one line naming what is missing, no traceback, no
    run in the store (not even the sweep's parent)."""
    import shutil

    import_or_skip("ray", reason="the cluster extra is not installed (make setup-cluster)")
    import_or_skip("submitit", reason="the cluster extra is not installed (make setup-cluster)")
    tools = tmp_path / "bin"  # a PATH with git, and no SLURM
    tools.mkdir()
    (tools / "git").symlink_to(shutil.which("git"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cases = [(["hydra/launcher=slurm"], {"PATH": str(tools)}, "hydra/launcher=slurm: SLURM's sbatch is not on"),
             (["hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address=127.0.0.1:{free_port()}"], {},
              "no Ray cluster answers there"),
             (["hydra/launcher=ray_cluster"], {"RAY_TMPDIR": str(tmp_path / "no-ray")},  # auto, no cluster here
              "address=auto: no Ray cluster runs on this machine"),
             (["hydra/launcher=ray_cluster"], {"RAY_ADDRESS": f"127.0.0.1:{free_port()}"},  # auto, a stale address
              "no Ray cluster answers there")]
    for args, env, says in cases:
        proc = run_cli("-m", "seed=0,1", *args, f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'multirun'}",
                       env=env, check=False, drop=("RAY_ADDRESS",))
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("catnet: error: ") and says in last, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "mlflow.db").exists() or runs_of(uri)[1] == []


@pytest.mark.slow
def test_ray_launcher_sweep_lands_as_children(tmp_path):
    import_or_skip("ray", reason="the cluster extra is not installed (make setup-cluster)")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_cli("-m", "train.lr=0.001,0.005", "train.epochs=6", "train.check_learned=false", f"tracking.uri={uri}", "tracking.experiment=test",
            "hydra/launcher=ray_local", f"hydra.sweep.dir={tmp_path / 'multirun'}")
    client, runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags.get("catnet.sweep") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.params["sweep.launcher"] == "RayLauncher"
    assert sorted(c.info.run_name for c in children) == ["#0 lr=0.001", "#1 lr=0.005"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert all(len(client.get_metric_history(c.info.run_id, "train/error")) == 6 for c in children)


@pytest.mark.slow
def test_dvc_exp_run_set_param_reaches_the_code(tmp_path):
    """`dvc exp run -S train.lr=...` in a copy of the project: the MLflow run and `dvc exp show`
    both carry the value."""
    import shutil

    work = tmp_path / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    shutil.copytree(ROOT / "data" / "raw", work / "data" / "raw")
    (work / ".dvc" / "config.local").write_text("")  # no remote needed: the data is in place
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = subprocess.run(
        ["dvc", "exp", "run", "-S", "train.lr=0.0123", "-S", "train.epochs=4", "-S", "train.check_learned=false", "-S", f"tracking.uri={uri}",
         "-S", "tracking.experiment=test"], cwd=work, env={**os.environ, **env}, capture_output=True, text=True)
    assert exp.returncode == 0, exp.stderr[-2000:] + exp.stdout[-2000:]
    _, runs = runs_of(uri)
    assert [(r.data.params["train.lr"], r.info.status) for r in runs] == [("0.0123", "FINISHED")]
    exp_name = runs[0].data.tags["catnet.dvc.exp_name"]  # the run carries the DVC experiment's name
    # and is named by it and by what -S changed (not tracking.*)
    assert exp_name and runs[0].info.run_name == f"{exp_name} epochs=4 lr=0.0123 check_learned=false"
    show = subprocess.run(["dvc", "exp", "show", "--json"], cwd=work, env={**os.environ, **env},
                          capture_output=True, text=True, check=True)
    assert "0.0123" in show.stdout and exp_name in show.stdout


@pytest.mark.slow
def test_optuna_search_lands_as_children_ranked_by_cross_validation(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "train.epochs=8", "train.check_learned=false",
                   f"hydra.sweeper.storage={tmp_path / 'study.log'}",
                   "data.cv_folds=2", f"tracking.uri={uri}", "tracking.experiment=test",
                   f"hydra.sweep.dir={tmp_path / 'multirun'}")
    log = proc.stderr + proc.stdout
    assert "\x1b[" not in log, log[:2000]  # no colour codes in a log that is not a terminal
    assert "setup plugin alembic" not in log and "A new study created" in log
    client, runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags.get("catnet.sweep") == "parent")
    assert parent.info.run_name == "optuna epochs=8 check_learned=false cv_folds=2 (3)"
    assert parent.data.params["sweep.launcher"] == "JoblibLauncher"  # the preset's trials side by side
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.params["sweep.sweeper"] == "OptunaSearch" and len(children) == 3
    assert all("cv/balanced_accuracy" in c.data.metrics for c in children if c.info.status == "FINISHED")
    assert parent.data.tags["catnet.best_by"] == "cv/balanced_accuracy"


@pytest.mark.slow
def test_compare_plots_the_curves_of_the_top_runs_of_its_table(sweep_store, monkeypatch):
    from hydra import compose, initialize_config_dir

    from pipeline import compare
    from pipeline.common import CONF_DIR

    client, runs = runs_of(sweep_store["uri"])
    # ranked by a metric whose values differ between the runs (the tiny sweep's validation
    # accuracies tie); the top and the bottom half cannot both be in the store's order
    for direction in ("maximize", "minimize"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="compare", overrides=[
                f"tracking.uri={sweep_store['uri']}", "experiment=test", "max_curves=2", f"direction={direction}",
                "objective=train/final_error",
                f"out_dir={sweep_store['tmp'] / 'compare_top'}"])
        plotted = {}
        monkeypatch.setattr(compare, "_plot", lambda f, histories: plotted.update(histories))
        table = compare.compare(cfg)
        assert [name.split()[0] for name in plotted] == table["run_id"].tolist()[:2]
        for name, history in plotted.items():
            run = next(r for r in runs if r.info.run_id.startswith(name.split()[0]))
            assert len(history) == int(run.data.params["train.epochs"])
            assert name.endswith(f"{run.data.metrics['train/final_error']:.4g}")


def test_each_childs_model_predicts_with_that_childs_own_weights(sweep_store):
    """Every child's ``runs:/<id>/model`` gives, on the test images, the probabilities of the network
    rebuilt from that child's own weights.npz artifact (inputs: pixels / 255, the default
    normalization), and not those of any other child."""
    import h5py
    import mlflow
    import numpy as np
    from conftest import REAL_TEST

    from catnet.network import Network, predict_proba

    client, runs = runs_of(sweep_store["uri"])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    with h5py.File(REAL_TEST) as f:
        x = f["test_set_x"][()]
    mlflow.set_tracking_uri(sweep_store["uri"])
    own = {}
    for child in children:
        folder = sweep_store["tmp"] / "artifacts" / child.info.run_id
        with np.load(client.download_artifacts(child.info.run_id, "weights.npz", str(folder)), allow_pickle=False) as f:
            net = Network.from_arrays(dict(f))
        own[child.info.run_id] = predict_proba(net, (x.reshape(len(x), -1) / 255.0).astype(net.weights[0].dtype))
    for child in children:
        got = mlflow.pyfunc.load_model(f"runs:/{child.info.run_id}/model").predict(x)["probability"].to_numpy()
        matches = [rid for rid, p in own.items() if np.allclose(got, p, rtol=1e-5, atol=0)]
        assert matches == [child.info.run_id], child.info.run_name
