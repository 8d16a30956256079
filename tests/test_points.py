"""A run's epoch points written in one statement (pipeline/tracking/points.py) leave the record
MLflow's own ``log_batch`` leaves: the same history of every key and the same latest values."""

from __future__ import annotations

import math

import pytest
from conftest import import_or_skip

from pipeline.tracking import points

T0 = 1_760_000_000.0  # seconds

# what a run's epochs send, in the order and shapes the store has to sort out: two keys, steps
# out of order, the same step at a later time, a NaN, both infinities, a point sent twice
BATCHES = [
    [("train/error", 0.9, T0, 0), ("train/accuracy", 0.5, T0, 0), ("train/error", 0.7, T0 + 0.001, 1),
     ("train/error", 0.8, T0 + 0.002, 3), ("train/error", 0.6, T0 + 0.003, 2)],
    [("train/error", 0.8, T0 + 0.002, 3), ("train/error", 0.75, T0 + 0.004, 3), ("train/accuracy", math.nan, T0, 1),
     ("train/margin", math.inf, T0, 0), ("train/margin", -math.inf, T0, 1)],
    [("train/error", 0.1, T0 + 0.005, 2), ("train/error", 0.1, T0 + 0.005, 2)],  # older step: not the latest
]


def _record(client, run_id: str) -> tuple[dict, dict]:
    run = client.get_run(run_id)
    history = {key: sorted((m.step, m.timestamp, repr(m.value)) for m in client.get_metric_history(run_id, key))
               for key in run.data.metrics}
    return history, {k: repr(v) for k, v in run.data.metrics.items()}


def _both(uri: str) -> tuple[tuple, tuple]:
    """The record of a run written by MLflow's log_batch and of one written by points.write."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("points")
    theirs, ours = (client.create_run(experiment).info.run_id for _ in range(2))
    for batch in BATCHES:
        client.log_batch(theirs, metrics=[Metric(k, v, int(t * 1000), s) for k, v, t, s in batch])
        points.write(client, ours, batch)
    return _record(client, theirs), _record(client, ours)


def test_the_record_is_the_one_mlflow_log_batch_makes_in_sqlite(tmp_path):
    theirs, ours = _both(f"sqlite:///{tmp_path}/mlflow.db")
    assert theirs[0]["train/error"][-1][0] == 3 and len(theirs[0]) == 3  # the case is what it says
    assert ours == theirs


def test_the_record_is_the_one_mlflow_log_batch_makes_in_postgresql(postgres):
    import_or_skip("psycopg", reason="the cluster extra is not installed (make setup-cluster)")
    theirs, ours = _both(postgres)
    assert ours == theirs


def test_a_deleted_run_takes_no_points_and_says_so(tmp_path):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("points")).info.run_id
    client.delete_run(run_id)
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        points.write(client, run_id, BATCHES[0])
    assert client.get_metric_history(run_id, "train/error") == []


def test_ten_thousand_points_in_one_write(tmp_path):
    """The reason for the module: one run's points as one transaction, each of them kept."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("points")).info.run_id
    points.write(client, run_id, [("train/error", 1.0 / (e + 1), T0 + e / 1000, e) for e in range(1, 10_001)])
    history = client.get_metric_history(run_id, "train/error")
    assert sorted(m.step for m in history) == list(range(1, 10_001))
    assert client.get_run(run_id).data.metrics == {"train/error": 1.0 / 10_001}


@pytest.mark.parametrize("bad, says", [(("bad/../name", 0.5, T0, 1), "bad/../name"),
                                        (("train/error", 0.5, -1.0, 2), "Timestamp must be a nonnegative")])
def test_what_mlflow_refuses_is_refused_and_nothing_of_the_batch_is_written(tmp_path, bad, says):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run_id = client.create_run(client.create_experiment("points")).info.run_id
    with pytest.raises(MlflowException, match=says):  # a key already checked, then a bad point of it
        points.write(client, run_id, [("train/error", 0.5, T0, 1), bad])
    assert client.get_metric_history(run_id, "train/error") == []


def test_a_run_with_its_jobs_chosen_id_is_the_run_mlflow_makes(tmp_path):
    """points.create_run (a sweep's helper makes each job's run with the id the job chose) leaves
    the row, tags and artifact location MLflow's own create_run leaves, and makes a run once."""
    import uuid

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("chosen", artifact_location=(tmp_path / "art").as_uri())
    tags = {"mlflow.parentRunId": "p" * 32, "catnet.seed": "3", "mlflow.user": "someone"}
    theirs = client.create_run(experiment, start_time=1_760_000_000_123, tags=tags, run_name="#3 seed=3").info.run_id
    ours = uuid.uuid4().hex
    assert points.create_run(client, ours, experiment, "#3 seed=3", tags, 1_760_000_000_123) is True
    assert points.create_run(client, ours, experiment, "other", {}, 0) is False  # there already: left as it is
    a, b = client.get_run(theirs), client.get_run(ours)
    assert b.info.run_id == ours and b.info.artifact_uri == a.info.artifact_uri.replace(theirs, ours)
    same = ("experiment_id", "run_name", "status", "start_time", "end_time", "lifecycle_stage", "user_id")
    assert {k: getattr(b.info, k) for k in same} == {k: getattr(a.info, k) for k in same}
    assert b.data.tags == a.data.tags
    client.log_artifact(ours, __file__)  # where MLflow puts its files
    assert [f.path for f in client.list_artifacts(ours)] == ["test_points.py"]
    client.delete_experiment(experiment)
    with pytest.raises(Exception, match="must be in the 'active' state"):
        points.create_run(client, uuid.uuid4().hex, experiment, "late", {}, 0)
