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
from pipeline.common import ROOT

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


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast, before any training, when no MLflow server answers at ``uri``
    (MLflow's own client retries for minutes)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            if r.status == 200:
                return
            reason = f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise ConfigError(f"tracking.uri={uri}: no MLflow server answers there ({reason})")


LOOPBACK = ("localhost", "127.0.0.1", "::1", "0.0.0.0")


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    return host in LOOPBACK or host.startswith("127.")


def only_this_host(cfg: DictConfig) -> bool:
    """Whether the configured store can be reached from this machine only: a SQLite file, or a
    server at a loopback address (which, on another machine, names that machine)."""
    from urllib.parse import urlparse

    uri = cfg.tracking.uri or ""
    if not uri or uri.startswith("sqlite:"):
        return True
    return uri.startswith(("http://", "https://")) and is_loopback(urlparse(uri).hostname or "")


def client(cfg: DictConfig):
    """An MlflowClient on the configured store (tracking and registry), which must answer."""
    import mlflow

    uri, _ = store_uri(cfg)
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    mlflow.set_tracking_uri(uri)  # model logging and loading resolve URIs through the fluent API
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def open_store(cfg: DictConfig, experiment: str | None = None, create: bool = True):
    """(client, experiment id) of ``experiment`` (default ``tracking.experiment``), created
    with its description if ``create`` and new; runs of this host orphaned by a dead process are
    closed on the way. Without ``create`` a missing experiment is a ConfigError."""
    c = client(cfg)
    name = experiment or cfg.tracking.experiment
    if create:
        experiment_id = _experiment_id(c, name, store_uri(cfg)[1])
    else:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise ConfigError(f"experiment={name!r}: no such MLflow experiment in {c.tracking_uri}")
        experiment_id = exp.experiment_id
    close_orphans(c, experiment_id)
    return c, experiment_id


def _experiment_id(client, name: str, artifact_root: Path | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = (artifact_root / name).as_uri() if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={"mlflow.note.content": EXPERIMENT_DESCRIPTION})
        except MlflowException:  # created meanwhile by a parallel job
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise ConfigError(f"tracking.experiment={name!r}: this experiment is deleted; restore it or pick another name")
    return exp.experiment_id


# ---- runs left RUNNING by a process that died (kill -9, a crashed machine) ----------------------

def process_tags() -> dict[str, str]:
    """Where this run runs: host, process id and that process's start time (a pid is reused)."""
    import psutil

    return {"catnet.host": socket.gethostname(), "catnet.pid": str(os.getpid()),
            "catnet.pid_started": f"{psutil.Process().create_time():.3f}"}


def process_alive(pid: int, started: float) -> bool:
    """Whether the process that started the run still exists (same pid and start time)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started != started or abs(proc.create_time() - started) < 1.0  # NaN: start unknown
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # no permission to look: it exists
        return True


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
