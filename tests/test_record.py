"""The record can be trusted: each run's files, model, status, name and selection are its own
and honest, also when sweeps run side by side, when a job fails or is killed."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REAL_TEST, needs_data, run_cli, runs_of

from pipeline.common import ROOT

pytestmark = needs_data


def _test_set():
    with h5py.File(REAL_TEST) as f:
        return f["test_set_x"][()], f["test_set_y"][()]


def independent_accuracy(weights: Path) -> float:
    """Test accuracy of a weights.npz, computed here from the file alone: threshold 0.5."""
    _, y = _test_set()
    return float(np.mean((independent_proba(weights) >= 0.5) == (y == 1)))


def independent_proba(weights: Path) -> np.ndarray:
    """P(cat) on the test set from a weights.npz alone: pixels / 255, then each layer's product
    and activation (sigmoid at the output)."""
    with np.load(weights, allow_pickle=False) as f:
        arrays = dict(f)
    x, y = _test_set()
    dtype = arrays["W1"].dtype
    a = x.reshape(len(x), -1).astype(dtype) / dtype.type(255)
    n = sum(1 for k in arrays if k.startswith("W"))
    hidden = str(arrays["activation"])
    for i in range(1, n + 1):
        z = a @ arrays[f"W{i}"] + (arrays[f"b{i}"] if f"b{i}" in arrays else 0)
        if i == n or hidden == "sigmoid":
            a = 1 / (1 + np.exp(-z))
        elif hidden == "tanh":
            a = np.tanh(z)
        else:
            a = np.maximum(z, 0)
    return a[:, 0]


def _download(client, run_id: str, path: str, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(dst)))


def _init_store(uri: str) -> None:
    """Create the store's tables before a child process writes to it while the test polls it
    (two processes migrating one new SQLite file at once collide)."""
    from mlflow import MlflowClient

    MlflowClient(uri).search_experiments()


def _popen(*args: str, cwd=ROOT):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# ---- 1. sweeps side by side: every run's files are its own ----------------------------------------

@pytest.mark.slow
def test_concurrent_sweeps_in_one_folder_log_only_their_own_files(tmp_path):
    """Three joblib sweeps started together into the same sweep folder (the worst case of
    Hydra's folder naming): each run's weights reproduce its own test accuracy, its history
    its own per-epoch errors, its config its own learning rate."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_cli("train.epochs=2", f"tracking.uri={uri}", "tracking.experiment=test", "train.check_learned=false",
            f"paths.out_dir={tmp_path / 'init'}")  # the store exists before the sweeps race
    common = ["train.epochs=150", f"tracking.uri={uri}", "tracking.experiment=test", "hydra/launcher=joblib",
              "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'shared'}"]
    sweeps = [("0.004,0.006", 0), ("0.005,0.007", 1), ("0.003,0.008", 2)]
    procs = [_popen("-m", f"train.lr={lrs}", f"seed={seed}", *common) for lrs, seed in sweeps]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    client, runs = runs_of(uri)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 6 and all(r.info.status == "FINISHED" for r in children)
    for r in children:
        rid = r.info.run_id
        weights = _download(client, rid, "weights.npz", tmp_path / rid)
        assert independent_accuracy(weights) == pytest.approx(r.data.metrics["test/accuracy"], abs=1e-12), rid
        with open(_download(client, rid, "train_history.csv", tmp_path / rid)) as f:
            rows = list(csv.DictReader(f))
        logged = sorted(client.get_metric_history(rid, "train/error"), key=lambda m: m.step)
        assert len(rows) == len(logged) == 150
        assert float(rows[-1]["error"]) == pytest.approx(logged[-1].value, rel=1e-6)
        text = Path(_download(client, rid, "config.yaml", tmp_path / rid)).read_text()
        assert f"lr: {r.data.params['train.lr']}" in text
        import mlflow  # every child has its model, made from its own weights

        mlflow.set_tracking_uri(uri)  # runs:/ URIs resolve the run's logged model through this store
        model_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{rid}/model", dst_path=str(tmp_path / rid / "m")))
        assert np.array_equal(np.load(model_dir / "artifacts/weights.npz")["W1"], np.load(weights)["W1"])
    assert len({r.data.tags["catnet.model_uri"] for r in children}) == 6


# ---- a run on the real data, shared by the checks below ----------------------------------------

@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("record")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    run_cli("train.epochs=200", "train.lr=0.006", f"tracking.uri={uri}", "tracking.experiment=test",
            f"paths.out_dir={tmp / 'out'}")
    client, runs = runs_of(uri)
    assert len(runs) == 1
    return {"uri": uri, "tmp": tmp, "client": client, "run": runs[0]}


@pytest.mark.slow
def test_the_model_lives_in_the_runs_experiment_and_loads_by_run_and_alias(single):
    import mlflow

    client, run = single["client"], single["run"]
    exp = client.get_experiment_by_name("test")
    models = client.search_logged_models([exp.experiment_id])
    assert [(m.name, m.source_run_id, str(m.status)) for m in models] == [("model", run.info.run_id, "READY")]
    assert client.search_logged_models(["0"]) == []  # nothing in "Default"
    assert [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs] == [models[0].model_id]
    mlflow.set_tracking_uri(single["uri"])
    x, _ = _test_set()
    by_run = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(x)
    assert float(np.mean(by_run["label"].to_numpy() == _test_set()[1])) == run.data.metrics["test/accuracy"]
    proc = run_cli(f"tracking.uri={single['uri']}", "experiment=test", "alias=best", module="pipeline.register")
    assert f"run {run.info.run_id}" in proc.stdout
    by_alias = mlflow.pyfunc.load_model("models:/catnet@best").predict(x)
    assert by_alias.equals(by_run)


def test_register_selects_on_training_metrics_when_there_is_no_validation(single):
    from mlflow import MlflowClient

    client = MlflowClient(single["uri"])
    run_cli(f"tracking.uri={single['uri']}", "experiment=test", "name=sel", module="pipeline.register")
    version = client.get_model_version_by_alias("sel", "champion")
    assert version.tags["selected_by"].startswith("train/balanced_accuracy="), version.tags


@pytest.mark.parametrize("module, args", [
    ("pipeline.register", ["metric=test/accuracy"]),
    ("pipeline.register", ["fallback=test/accuracy"]),
    ("pipeline.compare", ["objective=test/accuracy"]),
    ("pipeline.compare", ["fallback=test/error"]),
    ("pipeline", ["sweep.fallback=test/accuracy"]),
    ("pipeline", ["sweep.objective=test/balanced_accuracy"]),
])
def test_no_command_selects_on_a_test_metric(single, module, args):
    proc = run_cli(*args, f"tracking.uri={single['uri']}", module=module, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "never selected or ranked on the test set" in lines[0], proc.stderr


def test_the_run_keeps_no_path_of_this_machine(single):
    client, run = single["client"], single["run"]
    given = {single["uri"], str(single["tmp"] / "out")}  # what the test itself passed in
    values = [v for k, v in run.data.params.items() if v not in given and f"sqlite:///{v}" not in given]
    values += list(run.data.tags.values())
    values += [i.dataset.source for i in run.inputs.dataset_inputs]
    models = client.search_logged_models([run.info.experiment_id])
    import mlflow

    mlmodel = Path(mlflow.artifacts.download_artifacts(f"{models[0].artifact_location}/MLmodel",
                                                       dst_path=str(single["tmp"] / "m"))).read_text()
    for text in [*values, mlmodel]:
        assert str(ROOT) not in text and "/tmp/" not in text, text[:300]
    assert json.loads(run.inputs.dataset_inputs[0].dataset.source) == {
        "train": "data/raw/train_catvnoncat.h5", "test": "data/raw/test_catvnoncat.h5"}


def test_params_are_the_composed_config_and_the_names_say_what_differs(single):
    run = single["run"]
    assert {k for k in run.data.params if "." not in k} == {"seed"}
    assert run.info.run_name == "epochs=200 lr=0.006"
    exp = single["client"].get_experiment_by_name("test")
    assert exp.tags.get("mlflow.note.content", "").startswith("catnet")


def test_the_weights_file_rebuilds_the_network_it_came_from(tmp_path, store):
    """Stages in separate processes: a tanh network evaluated under a config that says sigmoid
    is still evaluated as tanh (the activation travels in weights.npz)."""
    args = [*store["args"], "train.epochs=150", "tracking.enabled=false", "train.check_learned=false"]
    for stage, extra in (("load", []), ("normalize", []), ("train", ["model.activation=tanh", "model.init=xavier"]),
                         ("evaluate", ["model.activation=sigmoid"])):
        run_cli(*args, *extra, module=f"pipeline.{stage}")
    weights = store["out"] / "models/weights.npz"
    assert str(np.load(weights)["activation"]) == "tanh"
    metrics = json.loads((store["out"] / "reports/metrics.json").read_text())
    assert metrics["test"]["accuracy"] == pytest.approx(independent_accuracy(weights), abs=1e-12)
    _, y = _test_set()
    sse = 0.5 * np.sum((y - independent_proba(weights).astype(np.float64)) ** 2)
    assert metrics["test"]["loss"] == pytest.approx(sse, rel=1e-4)


@pytest.mark.slow
def test_the_data_digest_names_the_data_used(tmp_path, store):
    """The digest is of the arrays the run used: a validation split changes it, a rerun does not;
    it is the md5 of the splits' bytes, checked here from the stage's own output files."""
    for i, frac in enumerate(("0", "0.2", "0.2")):
        run_cli("train.epochs=20", f"data.val_fraction={frac}", "train.check_learned=false",
                f"paths.out_dir={tmp_path / f'o{i}'}", f"tracking.uri={store['uri']}", "tracking.experiment=test")
    client, runs = runs_of(store["uri"])
    by_frac = {}
    for r in runs:
        by_frac.setdefault(r.data.params["data.val_fraction"], set()).add(r.data.tags["catnet.data.md5"])
    assert len(by_frac["0.2"]) == 1 and by_frac["0.2"] != by_frac["0.0"]
    flat = tmp_path / "o0" / "data/flat"
    h = hashlib.md5()
    for name in ("train", "test"):
        x, y = np.load(flat / f"{name}_x.npy"), np.load(flat / f"{name}_y.npy")
        h.update(f"{name}:{x.shape}:{x.dtype}".encode())
        h.update(x.tobytes())
        h.update(y.tobytes())
    assert by_frac["0.0"] == {h.hexdigest()}


# ---- 4. predict from anywhere ---------------------------------------------------------------------

def test_predict_takes_model_uri_and_paths_from_where_it_runs(single, tmp_path):
    from PIL import Image

    x, y = _test_set()
    Image.fromarray(x[0]).save(tmp_path / "a.png")
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    rid = single["run"].info.run_id
    proc = subprocess.run([sys.executable, "-m", "pipeline.predict", f"model_uri=runs:/{rid}/model", "images=[a.png]",
                           "csv=out.csv", f"tracking.uri={single['uri']}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1].startswith(f"{tmp_path / 'a.png'}\t")
    assert (tmp_path / "out.csv").read_text().startswith("path,label,probability")
    assert not (tmp_path / "outputs").exists()
    script = Path(sys.executable).parent / "catnet-predict"
    proc = subprocess.run([str(script), "model_uri=null", "images=[a.png]", "json=input.json"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.array_equal(np.asarray(json.loads((tmp_path / "input.json").read_text())["inputs"]), x[:1])


# ---- 5. failures are failures ---------------------------------------------------------------------

def test_a_sweep_with_a_failed_job_says_so_and_exits_non_zero(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli("-m", "train.lr=0.006,0.0o5", "train.epochs=100", f"tracking.uri={uri}", "tracking.experiment=test",
                   f"hydra.sweep.dir={tmp_path / 'multirun'}", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "sweep: 2 jobs, 1 finished, 1 failed" in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "catnet: error: sweep: 1 of 2 jobs failed"
    client, runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags.get("catnet.sweep") == "parent")
    children = {r.data.params.get("train.lr"): r for r in runs if r is not parent}
    assert children["0.006"].info.status == "FINISHED"
    bad = children["0.0o5"]
    assert bad.info.status == "FAILED" and "train.lr" in bad.data.tags["catnet.failure"]
    assert bad.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == "FAILED" and parent.data.tags["catnet.failure"] == "1 of 2 jobs failed"
    assert parent.data.metrics["sweep/failed"] == 1 and parent.data.metrics["sweep/finished"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]])
def test_sigterm_marks_the_sweep_and_its_running_children_killed(tmp_path, launcher):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _init_store(uri)
    proc = _popen("-m", "seed=0,1", "train.epochs=3000000", "tracking.flush_seconds=0.2", f"tracking.uri={uri}",
                  "tracking.experiment=test", f"hydra.sweep.dir={tmp_path / 'multirun'}", *launcher)
    try:
        for _ in range(600):  # until a child has logged epochs
            time.sleep(0.2)
            if (tmp_path / "mlflow.db").exists():
                client, runs = runs_of(uri)
                kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
                if kids and any(client.get_metric_history(k.info.run_id, "train/error") for k in kids):
                    break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == "catnet: interrupted by SIGTERM; stopped cleanly"
    time.sleep(1)
    client, runs = runs_of(uri)
    assert runs and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]


def test_a_parent_whose_summary_fails_is_failed(tmp_path):
    """The store refuses the parent's summary (a trigger of the SQLite file): the parent is FAILED
    with the store's words and the sweep exits 1."""
    import sqlite3

    from hydra import compose, initialize_config_dir

    from pipeline import sweep
    from pipeline.common import CONF_DIR

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs_of(uri)  # the store's tables, for the trigger
    db = sqlite3.connect(tmp_path / "mlflow.db")
    db.execute("CREATE TRIGGER gone BEFORE INSERT ON metrics WHEN NEW.key = 'sweep/jobs' "
               "BEGIN SELECT RAISE(ABORT, 'store gone'); END")
    db.commit()
    db.close()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=[f"tracking.uri={uri}", "tracking.experiment=test"])
    handler = signal.getsignal(signal.SIGTERM)
    callback = sweep.MlflowSweep()
    try:
        callback.on_multirun_start(cfg)
        with pytest.raises(SystemExit) as exit_:
            callback.on_multirun_end(cfg)
        assert exit_.value.code == 1
    finally:
        signal.signal(signal.SIGTERM, handler)
    client, runs = runs_of(uri)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "the sweep's summary could not be written" in runs[0].data.tags["catnet.failure"]
    assert "store gone" in runs[0].data.tags["catnet.failure"]


# ---- 6. a stage never revives a run --------------------------------------------------------------

def _stages(store, *stages, extra=(), check=True):
    procs = []
    for stage in stages:
        procs.append(run_cli(*store["args"], *extra, module=f"pipeline.{stage}", check=check))
    return procs


@pytest.mark.slow
def test_evaluate_never_continues_a_failed_training_run(store):
    _stages(store, "load", "normalize")
    _stages(store, "train", extra=["train.epochs=100"])
    diverged = run_cli(*store["args"], "train.lr=1e10", "train.epochs=500", module="pipeline.train", check=False)
    assert diverged.returncode == 2
    assert not (store["out"] / "reports/mlflow_run.json").exists()
    assert not (store["out"] / "models/weights.npz").exists()
    proc = run_cli(*store["args"], module="pipeline.evaluate", check=False)
    assert proc.returncode == 2 and "mlflow_run.json: not found" in proc.stderr.strip().splitlines()[-1]
    client, runs = runs_of(store["uri"])
    statuses = sorted(r.info.status for r in runs)
    assert statuses == ["FAILED", "KILLED"], statuses  # the handed-over run was superseded, not revived
    assert all("FINISHED" != r.info.status for r in runs)


@pytest.mark.slow
def test_evaluate_alone_after_a_finished_run_opens_a_new_run(store):
    _stages(store, "load", "normalize", "train", "evaluate", extra=["train.epochs=100"])
    _stages(store, "evaluate", extra=["train.epochs=100"])
    client, runs = runs_of(store["uri"])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    first = next(r for r in runs if "catnet.weights_run_id" not in r.data.tags)
    second = next(r for r in runs if "catnet.weights_run_id" in r.data.tags)
    assert second.data.tags["catnet.weights_run_id"] == first.info.run_id
    assert second.data.metrics["test/accuracy"] == first.data.metrics["test/accuracy"]
    assert len(client.get_metric_history(first.info.run_id, "train/error")) == 100


@pytest.mark.slow
def test_evaluate_after_the_store_was_made_anew_opens_a_new_run(store):
    _stages(store, "load", "normalize", "train", extra=["train.epochs=100"])
    trained_in = json.loads((store["out"] / "reports/mlflow_run.json").read_text())["run_id"]
    Path(store["uri"][len("sqlite:///"):]).unlink()  # the store is gone; the weights are still good
    _stages(store, "evaluate", extra=["train.epochs=100"])
    client, runs = runs_of(store["uri"])
    assert [(r.info.status, r.data.tags["catnet.weights_run_id"]) for r in runs] == [("FINISHED", trained_in)]


# ---- 7. a saturated network is a failure ---------------------------------------------------------

@pytest.mark.parametrize("args", [["train.lr=1e10", "seed=2"], ["train.lr=1e10", "model.activation=tanh"]])
def test_a_collapsed_network_fails_with_a_reason(store, args):
    proc = run_cli(*args, "train.epochs=300", *store["args"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "training failed" in proc.stderr or "training diverged" in proc.stderr, proc.stderr[-500:]
    client, runs = runs_of(store["uri"])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "Training" in runs[0].data.tags["catnet.failure"]
    assert not (store["out"] / "models/weights.npz").exists()


def test_the_check_compares_with_the_best_constant():
    from catnet.errors import TrainingCollapsed
    from catnet.train import check_learned

    y = np.array([1, 0, 0, 0])
    check_learned(np.array([0.9, 0.1, 0.2, 0.1]), y)  # learned: no error
    with pytest.raises(TrainingCollapsed, match="same output"):
        check_learned(np.full(4, 0.0), y)
    # 0.25 for every image is the best constant: 1/2 (0.75^2 + 3 * 0.25^2) = 0.375
    with pytest.raises(TrainingCollapsed, match=r"predicting 0.25 .*\(0.375\)"):
        check_learned(np.array([0.2, 0.3, 0.3, 0.3]), y)  # 1/2 (0.64 + 3 * 0.09) = 0.455


# ---- 8. runs of dead processes -----------------------------------------------------------------

@pytest.mark.slow
def test_a_run_killed_with_sigkill_is_closed_by_the_next_command(store):
    _init_store(store["uri"])
    proc = _popen("train.epochs=3000000", "tracking.flush_seconds=0.2", *store["args"])
    try:
        for _ in range(600):
            time.sleep(0.2)
            if (store["out"] / "reports").exists() or (Path(store["uri"][10:]).exists()):
                client, runs = runs_of(store["uri"])
                if runs and client.get_metric_history(runs[0].info.run_id, "train/error"):
                    break
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    client, runs = runs_of(store["uri"])
    assert runs[0].info.status == "RUNNING" and runs[0].data.tags["catnet.pid"] == str(proc.pid)
    run_cli(f"tracking.uri={store['uri']}", "experiment=test", module="pipeline.register", check=False)
    client, runs = runs_of(store["uri"])
    assert runs[0].info.status == "KILLED"
    assert f"process {proc.pid} on {socket.gethostname()} ended" in runs[0].data.tags["catnet.failure"]


def test_runs_of_live_processes_other_hosts_and_handoffs_are_left_alone(store, compose_cfg):
    import psutil

    from pipeline.tracking import store as tracking_store

    cfg = compose_cfg(f"tracking.uri={store['uri']}", "tracking.experiment=test")
    client, experiment_id = tracking_store.open_store(cfg)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = psutil.Process()
    here = socket.gethostname()
    cases = {
        "live": {"catnet.host": here, "catnet.pid": str(me.pid), "catnet.pid_started": f"{me.create_time():.3f}"},
        "other host": {"catnet.host": here + "-elsewhere", "catnet.pid": str(dead.pid), "catnet.pid_started": "1"},
        "handoff": {"catnet.host": here, "catnet.pid": str(dead.pid), "catnet.pid_started": "1",
                    "catnet.handoff": "evaluate"},
        "pid reused": {"catnet.host": here, "catnet.pid": str(me.pid), "catnet.pid_started": "1"},
        "dead": {"catnet.host": here, "catnet.pid": str(dead.pid), "catnet.pid_started": "1"},
    }
    ids = {name: client.create_run(experiment_id, run_name=name, tags=tags).info.run_id for name, tags in cases.items()}
    tracking_store.open_store(cfg)
    status = {name: client.get_run(rid).info.status for name, rid in ids.items()}
    assert status == {"live": "RUNNING", "other host": "RUNNING", "handoff": "RUNNING", "pid reused": "KILLED",
                      "dead": "KILLED"}


# ---- 10. what DVC and the UI show -----------------------------------------------------------------

@pytest.mark.slow
def test_dvc_metrics_show_reads_the_metrics_cleanly(store, tmp_path):
    """DVC takes a key named "error" in a metrics file for a failure to read it: the file a run
    writes, shown by DVC in a project of its own (this checkout may have none yet)."""
    run_cli("train.epochs=100", *store["args"])
    written = json.loads((store["out"] / "reports/metrics.json").read_text())
    assert all("error" not in m for m in written.values()) and "loss" in written["test"]
    project = tmp_path / "dvc-project"
    (project / "reports").mkdir(parents=True)
    (project / "reports/metrics.json").write_text(json.dumps(written))
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=project, check=True)
    proc = subprocess.run([dvc, "metrics", "show", "reports/metrics.json"], cwd=project, capture_output=True, text=True)
    assert proc.returncode == 0 and "failed to load" not in (proc.stdout + proc.stderr).lower(), proc.stderr
    assert "test.balanced_accuracy" in proc.stdout
    shown = subprocess.run([dvc, "metrics", "show", "--json", "reports/metrics.json"], cwd=project,
                           capture_output=True, text=True, check=True)
    assert json.loads(shown.stdout)[""]["data"]["reports/metrics.json"]["data"] == written


# ---- 9. a clean clone stays clean, and its run is complete ---------------------------------------

@pytest.mark.slow
def test_dvc_repro_in_a_clean_clone_finishes_its_run_and_changes_nothing(tmp_path):
    """What `make run` does in a fresh clone: every stage runs, git sees no change afterwards
    (so the run is not tagged dirty), and the one MLflow run is FINISHED with its model."""
    import shutil

    work = tmp_path / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    shutil.copytree(ROOT / "data" / "raw", work / "data" / "raw")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("HYDRA_FULL_ERROR", None)
    repro = subprocess.run(["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True)
    assert repro.returncode == 0, repro.stderr[-2000:] + repro.stdout[-2000:]
    assert "Running stage 'evaluate'" in repro.stdout
    status = subprocess.run(["git", "status", "--porcelain"], cwd=work, capture_output=True, text=True).stdout
    assert status == "", status
    client, runs = runs_of(f"sqlite:///{work / 'mlruns/mlflow.db'}", "catnet")
    assert [(r.info.status, r.data.tags["catnet.git.dirty"]) for r in runs] == [("FINISHED", "False")]
    assert "catnet.model_uri" in runs[0].data.tags and "catnet.handoff" not in runs[0].data.tags
