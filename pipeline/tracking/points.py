"""What MLflow's client makes slow or cannot do, written through a SQL store's own session:
a run's per-epoch points in one statement, and a run whose id its job chose (``create_run``).

``MlflowClient.log_batch`` makes one ORM object per point and flushes them through SQLAlchemy's
unit of work: 10,000 points cost a SQLite store about 1 s in Python, as long as training them
(benchmarks.sweeps: 20,000-epoch jobs). Into a SQLite or PostgreSQL store MLflow opened itself
(``sqlite:``, ``postgresql:`` URIs), ``write`` inserts the same rows with one executemany through
the store's own session (SQLite: the driver's, with a plain statement; PostgreSQL: SQLAlchemy's
batched insert of the store's table model), then updates the run's latest value of each key with
the store's own rule (``_update_latest_metrics_if_necessary``: greatest step, then time, then
value): about 0.05 s for 10,000 points into SQLite (0.15 s through SQLAlchemy's insert, whose
per-row bookkeeping cost a joblib sweep's busy cores 0.25 s a 20,000-epoch job). The record is
the one ``log_batch`` makes (tests/test_points.py compares them); like it, it refuses what
MLflow's validation refuses (a bad key), does not write a point already in the run twice, stores
a NaN as 0 flagged NaN and an infinity as the largest float. A server (``http(s):``) or any
other database gets ``log_batch`` itself. This reads MLflow internals (the client's store, its models),
which the pinned version (requirements.lock) fixes; tests/test_points.py fails if they move.
"""

from __future__ import annotations

Point = tuple[str, float, float, int]  # (key, value, time in seconds, step)


def _insert_for(store):
    """The dialect's INSERT that skips rows already there, if ``store`` is a SQL store of one."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    if not isinstance(store, SqlAlchemyStore):
        return None
    if store.db_type == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif store.db_type == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        return None
    return insert


# SQLite's own executemany of plain tuples: the same rows as SQLAlchemy's insert of SqlMetric
# (tests/test_points.py), without its per-row parameter processing
_SQLITE_INSERT = ("INSERT INTO metrics (key, value, timestamp, step, is_nan, run_uuid) "
                  "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING")


def write(client, run_id: str, points: list[Point]) -> None:
    """Write ``points`` to run ``run_id`` of ``client``'s store; raises what the store raised."""
    if not points:
        return
    store = client._tracking_client.store
    insert = _insert_for(store)
    if insert is None:
        from mlflow.entities import Metric

        client.log_batch(run_id, metrics=[Metric(k, float(v), int(t * 1000), step) for k, v, t, step in points])
        return
    from mlflow.store.tracking.dbmodels.models import SqlMetric
    from mlflow.utils.validation import _validate_metric

    rows, latest, checked = [], {}, set()
    sanitize = store.sanitize_metric_value
    for key, value, t, step in points:
        value, timestamp, step = float(value), int(t * 1000), int(step)
        if key not in checked or timestamp < 0:  # what log_batch refuses, refused alike: a key's
            _validate_metric(key, value, timestamp, step)  # name once; a float value, an int step
            checked.add(key)  # always pass; a negative time is refused by the same call
        is_nan, value = sanitize(value)
        row = (key, value, timestamp, step, is_nan, run_id)
        rows.append(row)
        last = latest.get(key)
        if last is None or (step, timestamp, value) > (last[3], last[2], last[1]):
            latest[key] = row
    with store.ManagedSessionMaker(read_only=False) as session:
        store._check_run_is_active(store._get_run(run_uuid=run_id, session=session))
        if store.db_type == "sqlite":
            session.connection().exec_driver_sql(_SQLITE_INSERT, rows)
        else:
            session.execute(insert(SqlMetric).on_conflict_do_nothing(), [_as_dict(row) for row in rows])
        store._update_latest_metrics_if_necessary([SqlMetric(**_as_dict(row)) for row in latest.values()], session)


def _as_dict(row: tuple) -> dict:
    key, value, timestamp, step, is_nan, run_id = row
    return {"key": key, "value": value, "timestamp": timestamp, "step": step, "is_nan": is_nan, "run_uuid": run_id}


def sql_store(client) -> bool:
    """Whether ``client`` writes to a database MLflow opened itself (not through a server)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    return isinstance(client._tracking_client.store, SqlAlchemyStore)


def create_run(client, run_id: str, experiment_id: str, name: str, tags: dict[str, str], start_ms: int) -> bool:
    """Create run ``run_id`` (a uuid4 hex its job chose: the job goes on before the store has it)
    as ``client.create_run`` would (MLflow's SQL store's row, its artifact location, tags and
    ``mlflow.runName``); nothing if it exists already. Whether it was created."""
    from mlflow.entities import LifecycleStage, RunStatus, SourceType
    from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.utils.uri import append_to_uri_path

    store = client._tracking_client.store
    if not sql_store(client):
        raise TypeError(f"a run with a chosen id needs a SQL store, not {type(store).__name__}")
    tags = {**tags, "mlflow.runName": name}
    with store.ManagedSessionMaker(read_only=False) as session:
        if session.query(SqlRun.run_uuid).filter(SqlRun.run_uuid == run_id).first() is not None:
            return False
        experiment = store.get_experiment(experiment_id)
        store._check_experiment_is_active(experiment)
        run = SqlRun(name=name, run_uuid=run_id, experiment_id=experiment_id,
                     artifact_uri=append_to_uri_path(experiment.artifact_location, run_id,
                                                     SqlAlchemyStore.ARTIFACTS_FOLDER_NAME),
                     source_type=SourceType.to_string(SourceType.UNKNOWN), source_name="", entry_point_name="",
                     user_id=tags.get("mlflow.user", "unknown"), status=RunStatus.to_string(RunStatus.RUNNING),
                     start_time=start_ms, end_time=None, deleted_time=None, source_version="",
                     lifecycle_stage=LifecycleStage.ACTIVE)
        run.tags = [SqlTag(key=k, value=v) for k, v in tags.items()]
        session.add(run)
    return True
