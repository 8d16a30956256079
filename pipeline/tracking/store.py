"""Where the record lives: the tracking URI, the client, the experiment, and runs left behind.

Every catnet command that opens a store goes through ``open_store``: it makes SQLite paths
absolute (Hydra jobs and DVC's temporary runs start in other directories), fails fast when an
``http(s)`` server does not answer, creates the experiment (with a description) if it is new,
and marks as KILLED the runs of this host whose process died without closing them.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from omegaconf import DictConfig

from catnet.errors import ConfigError
from pipeline.common import ROOT, is_multirun
from pipeline.processes import process_alive
from pipeline.tracking.outage import (  # noqa: F401 - what callers name as store's
    Patient, RecordLost, ServerUnreachable, bound_retries, brief, check_server, unreachable)

log = logging.getLogger("catnet")

EXPERIMENT_DESCRIPTION = (
    "catnet: a from-scratch NumPy network telling cat from non-cat in 64x64 images. "
    "One run per pipeline execution (load, normalize, train, evaluate); a sweep is a parent run "
    "(tag catnet.sweep=parent) with one child per job. Jobs are ranked on validation, "
    "cross-validation or training metrics, never on test/."
)
HANDOFF_TAG = "catnet.handoff"  # a train stage's run waiting for the evaluate stage (dvc repro)


def store_uri(cfg: DictConfig) -> tuple[str, Path | None]:
    """(tracking URI, artifact root). SQLite paths become absolute, so Hydra jobs and DVC's
    temporary runs in other directories all write to the same store."""
    uri = cfg.tracking.uri or "sqlite:///mlruns/mlflow.db"
    if uri.startswith("sqlite:///"):
        path_part, _, query = uri[len("sqlite:///"):].partition("?")
        path = Path(path_part).expanduser()
        # relative to the project; inside `dvc exp run --temp`, to the project DVC runs for
        db = path if path.is_absolute() else Path(os.environ.get("DVC_ROOT") or ROOT) / path
        db.parent.mkdir(parents=True, exist_ok=True)
        # parallel jobs share the file: wait up to 30 s for a write lock (Python's default is 5 s)
        return f"sqlite:///{db}?{query or 'timeout=30'}", db.parent / "artifacts"
    if uri.startswith(("http://", "https://", "databricks")):
        return uri, None
    raise ConfigError(
        f"tracking.uri={uri!r}: use sqlite:///<path>.db or http(s)://<server> "
        "(MLflow's file store is not supported)"
    )


UNREACHABLE = ".catnet-server-unreachable"  # in a sweep's folder: a job gave up waiting for the server


def wait_for_server(cfg: DictConfig, folder: Path | None) -> None:
    """A sweep's job whose tracking server does not answer waits for it up to
    ``tracking.retry_seconds`` (it answered when the sweep started: a restart, a short outage);
    once a job gave up (a file in the sweep's ``folder`` says so), the next ones ask only once, so
    a server gone for good fails the rest of the sweep quickly."""
    uri = store_uri(cfg)[0] if cfg.tracking.enabled else ""
    if not uri.startswith(("http://", "https://")):
        return
    marker = folder / UNREACHABLE if folder is not None and folder.is_dir() else None
    wait = 0.0 if marker is not None and marker.exists() else float(cfg.tracking.retry_seconds or 0)
    try:
        check_server(uri, wait)
    except ServerUnreachable:
        if marker is not None:
            marker.touch()
        raise
    if marker is not None:
        marker.unlink(missing_ok=True)


def import_mlflow() -> None:
    """Import MLflow, once. Its import makes about 200,000 objects that live as long as the process;
    the garbage collector pauses for it, then they are frozen out of its reach (``gc.freeze``), which
    spares a run about a second of collections."""
    import gc
    import sys

    if "mlflow" in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        import mlflow  # noqa: F401
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def client(cfg: DictConfig):
    """An MlflowClient on the configured store (tracking and registry), which must answer; of a
    server, one that waits out an outage of it (``Patient``: tracking.retry_seconds)."""
    uri, _ = store_uri(cfg)
    import_mlflow()
    import mlflow

    mlflow.set_tracking_uri(uri)  # model logging and loading resolve URIs through the fluent API
    mlflow.set_registry_uri(uri)
    made = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    if not uri.startswith(("http://", "https://")):
        return made
    bound_retries()
    check_server(uri)
    check_login(made, uri)
    return Patient(made, uri, cfg.tracking.get("retry_seconds"))


def check_login(client, uri: str) -> None:
    """One line, before anything is written, when the server wants a login not given, or refuses it."""
    from mlflow.exceptions import MlflowException

    try:
        client.search_experiments(max_results=1)
    except MlflowException as e:
        status = next((code for code in (401, 403) if f"error code {code}" in str(e)), None)
        if status is None:
            raise
        given = "was refused" if os.environ.get("MLFLOW_TRACKING_USERNAME") else "was not given"
        raise ConfigError(f"tracking.uri={uri}: the server asks for a login, which {given} (HTTP {status}): set "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (make team-up's stack: source "
                          "team/env)") from None


def open_store(cfg: DictConfig, experiment: str | None = None, create: bool = True):
    """(client, experiment id) of ``experiment`` (default ``tracking.experiment``), created with its
    description if ``create`` and new (else a ConfigError); runs of this host's dead processes closed.
    A sweep's jobs in one process open a database store once; a server is asked each time."""
    name = experiment or cfg.tracking.experiment
    key = (store_uri(cfg)[0], name)
    if create and key in _OPENED and is_multirun() and not key[0].startswith(("http://", "https://")):
        import mlflow

        mlflow.set_tracking_uri(key[0])  # as ``client`` does: another job may have set another
        mlflow.set_registry_uri(key[0])
        return _OPENED[key]
    c = client(cfg)
    if create:
        experiment_id = ensure_experiment(c, name, store_uri(cfg)[1])
    else:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise ConfigError(f"experiment={name!r}: no such MLflow experiment in {c.tracking_uri} (another store, "
                              "a team's server: tracking.uri=http://<server>:5000)")
        experiment_id = exp.experiment_id
    close_orphans(c, experiment_id)
    if create:
        _OPENED[key] = (c, experiment_id)
    return c, experiment_id


_OPENED: dict[tuple[str, str], tuple] = {}  # (store URI, experiment) -> (client, experiment id), for a sweep


# MLflow 3's UI opens an experiment without this tag on its GenAI (traces) page; this value opens
# it on its training runs (tests/test_tracking.py)
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ensure_experiment(client, name: str, artifact_root: Path | None) -> str:
    """The id of experiment ``name``, created (with catnet's description and kind) if new; a
    ConfigError if it is deleted."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = (artifact_root / name).as_uri() if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={"mlflow.note.content": EXPERIMENT_DESCRIPTION,
                                                  EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]})
        except MlflowException:  # created meanwhile by a parallel job
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise ConfigError(f"tracking.experiment={name!r}: this experiment is deleted; restore it or pick another name")
    if EXPERIMENT_KIND[0] not in exp.tags:  # made by an older catnet, or by hand: a user's own kind is kept
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


# ---- runs left RUNNING by a process that died (kill -9, a crashed machine) ----------------------

def close_orphans(client, experiment_id: str) -> list[str]:
    """Mark KILLED, with the reason, the RUNNING runs of this host whose process is gone.

    Never touched: a run whose process still lives; another host's runs; a run the train stage
    handed to the evaluate stage (``catnet.handoff``: its process ends by design); a run without
    process tags (not started by catnet, or by an older catnet)."""
    host = socket.gethostname()
    runs = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and tags.`catnet.host` = '{host}'",
                              max_results=1000)
    closed = []
    for run in runs:
        tags = run.data.tags
        if HANDOFF_TAG in tags or "catnet.pid" not in tags:
            continue
        try:
            pid, started = int(tags["catnet.pid"]), float(tags.get("catnet.pid_started", "nan"))
        except ValueError:
            continue
        if process_alive(pid, started):
            continue
        client.set_tag(run.info.run_id, "catnet.failure",
                       f"its process {pid} on {host} ended without closing the run (killed, or the "
                       f"machine stopped); marked KILLED by a later catnet command")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.warning("tracking: %d run(s) of dead processes on this host marked KILLED: %s",
                    len(closed), ", ".join(closed))
    return closed
