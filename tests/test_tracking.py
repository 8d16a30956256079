"""The MLflow adapter: honest run status, batched per-epoch metrics, absolute store paths."""

from __future__ import annotations

import pytest
from conftest import needs_data, runs_of

from catnet.errors import DataError
from pipeline import tracking

pytestmark = needs_data


@pytest.fixture
def cfg(compose_cfg, store):
    return compose_cfg(f"tracking.uri={store['uri']}", "tracking.experiment=test")


def test_failure_marks_the_run_failed_with_the_reason(cfg, store):
    with pytest.raises(DataError):
        with tracking.open_run(cfg):
            raise DataError("x.h5: file not found")
    client, runs = runs_of(store["uri"])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["catnet.failure"] == "DataError: x.h5: file not found"


def test_ctrl_c_marks_the_run_killed_and_keeps_the_epochs(cfg, store):
    with pytest.raises(KeyboardInterrupt):
        with tracking.open_run(cfg) as run:
            for epoch in range(1, 8):
                run.log_epoch(epoch, {"train/error": 1.0 / epoch})
            raise KeyboardInterrupt
    client, runs = runs_of(store["uri"])
    assert runs[0].info.status == "KILLED"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/error")) == 7


@pytest.mark.parametrize("signal", ["KeyboardInterrupt", "Terminated"])
def test_a_run_stopped_while_its_first_records_are_written_is_killed_not_failed(cfg, store, monkeypatch, signal):
    """Ctrl-C or SIGTERM just after the run was created (a sweep stopped as a job starts: seen in
    CI, where the run ended FAILED although the job was stopped)."""
    from mlflow import MlflowClient

    from pipeline.common import Terminated

    error = KeyboardInterrupt() if signal == "KeyboardInterrupt" else Terminated("SIGTERM")

    def stopped(*args, **kwargs):
        raise error

    monkeypatch.setattr(MlflowClient, "log_artifact", stopped)  # config.yaml
    with pytest.raises(type(error)):
        with tracking.open_run(cfg):
            pass
    client, runs = runs_of(store["uri"])
    assert [r.info.status for r in runs] == ["KILLED"]
    assert runs[0].data.tags["catnet.failure"] == f"{signal}: {error}"


def test_a_link_to_a_reused_run_stopped_while_written_is_killed_not_failed(cfg, store, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.common import Terminated
    from pipeline.tracking import query, reuse

    with tracking.open_run(cfg, tags={reuse.IDENTITY_TAG: "key"}) as run:
        original = run.run_id
    client, _ = runs_of(store["uri"])

    def stopped(*args, **kwargs):
        raise Terminated("SIGTERM")

    monkeypatch.setattr(MlflowClient, "log_batch", stopped)
    earlier = query.identical(client, client.get_run(original).info.experiment_id, "key")
    assert earlier is not None and earlier.run_id == original
    with pytest.raises(Terminated):
        reuse.link(cfg, earlier)
    _, runs = runs_of(store["uri"])
    assert sorted((r.info.status, reuse.REUSED_TAG in r.data.tags) for r in runs) == [("FINISHED", False),
                                                                                      ("KILLED", True)]


def test_a_run_continued_by_a_later_stage_finishes_once(cfg, store):
    with tracking.open_run(cfg, finish=False) as run:
        for epoch in range(1, 2501):  # more than one log_batch call can carry
            run.log_epoch(epoch, {"train/error": float(epoch)})
        info = {"run_id": run.run_id, "tracking_uri": run.tracking_uri}
    client, runs = runs_of(store["uri"])
    assert runs[0].info.status == "RUNNING"
    with tracking.open_run(cfg, resume=info) as run:
        run.log_metrics({"test/accuracy": 0.5})
    client, runs = runs_of(store["uri"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(run.run_id, "train/error")) == 2500


def test_relative_sqlite_uri_is_made_absolute(compose_cfg):
    uri, artifacts = tracking.store_uri(compose_cfg())
    assert uri.startswith("sqlite:////") and uri.endswith("/mlruns/mlflow.db?timeout=30")
    assert artifacts.is_absolute() and artifacts.parent.name == "mlruns"


def test_tracking_off_never_imports_mlflow(compose_cfg):
    import subprocess
    import sys

    code = ("import sys; from pipeline import tracking; from omegaconf import OmegaConf;"
            "cfg = OmegaConf.create({'tracking': {'enabled': False}});"
            "cm = tracking.open_run(cfg); run = cm.__enter__(); run.log_epoch(1, {'e': 1.0});"
            "print('mlflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_dataset_insert_race_is_retried_and_other_errors_are_not():
    """Two first runs on one store can both insert the dataset row; the loser retries and links
    the row the winner wrote (seen with 2 joblib workers on a fresh store)."""
    from mlflow.exceptions import MlflowException

    class Client:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def log_inputs(self, run_id, inputs):
            self.calls += 1
            if self.errors:
                raise MlflowException(self.errors.pop(0))

    race = "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name"
    client = Client([race, race])
    tracking.run.log_data(client, "run", "md5", {})
    assert client.calls == 3
    client = Client(["RESOURCE_DOES_NOT_EXIST: run"])
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST"):
        tracking.run.log_data(client, "run", "md5", {})
    assert client.calls == 1
    client = Client([race] * 5)
    with pytest.raises(MlflowException, match="UNIQUE"):
        tracking.run.log_data(client, "run", "md5", {})
    assert client.calls == 5


def test_mlflow_is_imported_once_with_the_garbage_collector_paused_then_out_of_its_reach():
    """MLflow's ~200,000 import-time objects are frozen (gc.freeze), so later collections skip
    them; the collector runs again afterwards, and nothing is imported or frozen twice."""
    import subprocess
    import sys

    from pipeline.common import ROOT

    code = ("import gc, sys; from pipeline.tracking import store\n"
            "store.import_mlflow(); frozen = gc.get_freeze_count()\n"
            "store.import_mlflow()\n"
            "print(frozen, gc.get_freeze_count(), gc.isenabled())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    frozen, again, enabled = out.stdout.split()
    assert int(frozen) > 100_000 and int(again) == int(frozen)
    assert enabled == "True"


def test_a_model_pins_the_versions_this_process_imported(cfg, store, tmp_path):
    """The model's requirements are numpy, pandas and mlflow at the versions that trained it; it is
    logged as the run's LoggedModel (models:/<id>), the run's output."""
    import numpy as np
    import pandas

    import mlflow
    from pipeline.tracking import model

    weights = {"W1": np.ones((12288, 1), np.float32), "activation": np.array("sigmoid"),
               "image_shape": np.array([64, 64, 3])}
    normalizer = {"scale": np.array(255.0)}
    with tracking.open_run(cfg) as run:
        uri = model.log_model(run.client, run.run_id, tmp_path, weights, normalizer)
        requirements = (tmp_path / "model" / "requirements.txt").read_text().split()
    assert requirements == [f"numpy=={np.__version__}", f"pandas=={pandas.__version__}", f"mlflow=={mlflow.__version__}"]
    assert uri.startswith("models:/")
    client, _ = runs_of(store["uri"])
    outputs = client.get_run(run.run_id).outputs
    assert [o.model_id for o in outputs.model_outputs] == [uri.removeprefix("models:/")]


@pytest.mark.parametrize("tracked", [True, False])
def test_an_output_made_later_is_published_as_the_run_s_block_ends_and_never_after_a_failure(
        compose_cfg, store, tmp_path, tracked):
    """log_output_later (the learning curve, drawn by another process while the run goes on): its
    bytes are asked for once the stages are done, written and logged before the run ends; a block
    that failed publishes nothing of it."""
    cfg = compose_cfg(f"tracking.uri={store['uri']}", "tracking.experiment=test", f"tracking.enabled={tracked}")
    asked = []
    with tracking.open_run(cfg) as run:
        run.log_output_later(tmp_path / "curve.png", lambda: asked.append(1) or b"\x89PNG made later")
        assert asked == [] and not (tmp_path / "curve.png").exists()
    assert (tmp_path / "curve.png").read_bytes() == b"\x89PNG made later" and asked == [1]
    with pytest.raises(DataError):
        with tracking.open_run(cfg) as run:
            run.log_output_later(tmp_path / "failed.png", lambda: asked.append(2) or b"never")
            raise DataError("evaluate failed")
    assert not (tmp_path / "failed.png").exists() and asked == [1]
    client, runs = runs_of(store["uri"])
    if tracked:
        assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
        done = next(r for r in runs if r.info.status == "FINISHED")
        failed = next(r for r in runs if r.info.status == "FAILED")
        assert [a.path for a in client.list_artifacts(done.info.run_id)] == ["config.yaml", "curve.png"]
        assert [a.path for a in client.list_artifacts(failed.info.run_id)] == ["config.yaml"]
    else:
        assert runs == []


def test_an_experiment_opens_on_its_training_runs_in_the_mlflow_ui(compose_cfg, tmp_path):
    """MLflow 3's UI opens an experiment without the tag mlflow.experimentKind on its GenAI
    (traces) page: catnet's experiments carry the kind of training runs, new ones from the start
    and ones made before (or by hand) once catnet opens them; a kind set by the user is kept."""
    from mlflow import MlflowClient

    from pipeline.tracking import store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_cfg(f"tracking.uri={uri}", "tracking.experiment=new")
    client, new = store.open_store(cfg)
    assert client.get_experiment(new).tags["mlflow.experimentKind"] == "custom_model_development"
    plain = MlflowClient(tracking_uri=uri)
    old = plain.create_experiment("old")
    mine = plain.create_experiment("mine", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("old", "mine"):
        store.open_store(compose_cfg(f"tracking.uri={uri}", f"tracking.experiment={name}"))
    assert plain.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert plain.get_experiment(mine).tags["mlflow.experimentKind"] == "genai_development"


def test_reproduce_sees_a_difference_of_one_unit_in_the_last_place():
    """The bit-for-bit comparison of two weights.npz: identical arrays pass; one value moved by one
    unit in the last place (np.nextafter), the same values in another dtype, or another array
    name, each is a difference, named with its size."""
    import numpy as np

    from pipeline.reproduce import _same, weight_differences

    rng = np.random.default_rng(0)
    a = {"W1": rng.standard_normal((6, 4)).astype(np.float32), "W2": rng.standard_normal((4, 1)).astype(np.float32)}
    assert weight_differences(a, {k: v.copy() for k, v in a.items()}) == []
    moved = {k: v.copy() for k, v in a.items()}
    moved["W2"][3, 0] = np.nextafter(moved["W2"][3, 0], np.float32(np.inf))
    lines = weight_differences(a, moved)
    assert lines[0] == "  weights.npz: 1 of 2 arrays differ" and "W2: largest difference" in lines[1]
    assert lines[1].endswith("1 of 4 values differ") and "W1" not in "".join(lines)
    assert weight_differences(a, {**a, "W1": a["W1"].astype(np.float64)})[1].startswith("    W1: float32(6, 4)")
    assert weight_differences(a, {"W1": a["W1"]}) == ["  weights.npz: arrays ['W1', 'W2'] -> ['W1']"]
    assert _same(float("nan"), float("nan")) and not _same(0.5, np.nextafter(0.5, 1.0))


def test_a_run_is_found_by_its_whole_id_or_a_unique_prefix_of_8(store):
    """query.run_of: the whole id, 8 or more of its first characters (any case), in any experiment;
    fewer, or a prefix no run or several runs have, is a one-line error naming the knob."""
    from catnet.errors import ConfigError
    from pipeline.tracking import query

    client, _ = runs_of(store["uri"])
    other = client.create_experiment("other")
    run_id = client.create_run(other).info.run_id
    for given in (run_id, run_id[:8], run_id[:12].upper()):
        assert query.run_of(client, given).info.run_id == run_id
    with pytest.raises(ConfigError, match=f"parent={run_id[:7]}: give a run's id, or at least its first 8"):
        query.run_of(client, run_id[:7], "parent")
    absent = ("0" if run_id[0] != "0" else "1") * 8
    with pytest.raises(ConfigError, match=f"run_id={absent}: no run in sqlite:///"):
        query.run_of(client, absent)

    class Two:  # two runs share 8 characters: rare with uuid4 ids, so a stub says it
        tracking_uri = "sqlite:///x.db"

        def search_experiments(self, view_type):
            return [type("E", (), {"experiment_id": "1"})]

        def search_runs(self, *args, **kwargs):
            return [type("R", (), {"info": type("I", (), {"run_id": f"abcdef01{n * 24}"})}) for n in "12"]

    with pytest.raises(ConfigError, match="run_id=abcdef01: 2 runs .* give more of it"):
        query.run_of(Two(), "abcdef01")
