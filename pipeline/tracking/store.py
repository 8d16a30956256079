"""Where the record lives: the tracking URI, the client, the experiment, and runs left behind.

Every catnet command that opens a store goes through ``open_store``: it makes SQLite paths
absolute (Hydra jobs and DVC's temporary runs start in other directories), fails fast when an
``http(s)`` server does not answer, creates the experiment (with a description) if it is new,
and marks as KILLED the runs of this host whose process died without closing them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path

from omegaconf import DictConfig

from catnet.errors import CatnetError, ConfigError
from pipeline.common import ROOT, is_multirun

log = logging.getLogger("catnet")

EXPERIMENT_DESCRIPTION = (
    "catnet: a from-scratch NumPy network telling cat from non-cat in 64x64 images. "
    "One run per pipeline execution (load, normalize, train, evaluate); a sweep is a parent run "
    "(tag catnet.sweep=parent) with one child per job. Jobs are ranked on validation, "
    "cross-validation or training metrics, never on test/."
)
SLURM_TAG = "catnet.slurm.job_id"  # the SLURM job a run ran in
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


def server_answer(uri: str, timeout: float = 10.0) -> str | None:
    """None when the MLflow server at ``uri`` answers its health check, else why not."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))


def check_server(uri: str, wait: float = 0.0) -> None:
    """Fail when no MLflow server answers at ``uri`` (MLflow's own client retries for minutes):
    at once by default (a wrong URI is told in a second, before any training), or after
    ``wait`` seconds of asking again every second (a sweep's job, whose server answered when the
    sweep started, waits out a short outage)."""
    deadline = time.monotonic() + wait
    while (reason := server_answer(uri)) is not None and time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    if reason is not None:
        waited = f" for {wait:g} s" if wait else ""
        raise ServerUnreachable(f"tracking.uri={uri}: no MLflow server answers there{waited} ({reason})")


class ServerUnreachable(CatnetError):
    """The tracking server does not answer."""


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` is the tracking server not answering (after MLflow's retries)."""
    import requests
    import urllib3

    lost = (ServerUnreachable, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)  # killed mid-answer
    seen = error
    while seen is not None:
        if isinstance(seen, lost):
            return True
        seen = seen.__cause__ or seen.__context__
    return any(m in str(error) for m in ("Max retries exceeded", "Connection broken", "Connection aborted"))


def brief(error: BaseException) -> str:
    """An MLflow client error's first line (after its retries, a long message), at most 300 characters;
    SQLAlchemy's note that a flush raised it is not that line (the database's words follow it)."""
    lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith("(raised as a result of")]
    return (lines or [type(error).__name__])[0][:300]


class RecordLost(CatnetError):
    """A run's final status could not be written: it stays RUNNING in the store until a later
    catnet command (or the sweep's end) closes it."""

    def __init__(self, run_id: str, status: str, error: BaseException):
        super().__init__(f"MLflow run {run_id} could not be marked {status} ({brief(error)}); it stays RUNNING")
        self.run_id = run_id  # run.recorded() and run.unfinished() read it: the run exists, RUNNING


def bound_retries() -> None:
    """Leave waiting out an outage to ``patiently``, with one rule for every request: MLflow's own
    HTTP retries (7 with a backoff factor of 2 by default, about 4 minutes, then up to 2 minutes
    between attempts after the server is back) are turned off, so a request that cannot reach the
    server fails at once and ``patiently`` asks again as soon as the server answers. MLflow reads
    these variables at each request, in this process and the processes it starts."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"


_LOST_SINCE: list[float] = []  # when the server stopped answering, while it does not (for the log)


def patiently(uri: str, seconds: float | None, call, *args, **kwargs):
    """``call(*args, **kwargs)``, asked again while the server at ``uri`` does not answer, until
    ``seconds`` (``tracking.retry_seconds``) have passed since it stopped answering; then what the
    last attempt raised. Each attempt waits for the server's health check to answer (asked every
    second) first. Any other error is raised at once. A request cut off mid-answer may have been
    done: the calls a run makes are safe to ask twice (params and tags of the same value, metrics
    MLflow skips when already there, artifacts written whole) except run creation, whose orphan
    would stay RUNNING until its process ends and a later command closes it."""
    since = None
    while True:
        try:
            result = call(*args, **kwargs)
        except Exception as e:
            if seconds is None or not unreachable(e):
                raise
            now = time.monotonic()
            since = since if since is not None else now
            left = since + float(seconds) - now
            if left <= 0:
                raise
            if not _LOST_SINCE:
                _LOST_SINCE.append(now)
                log.warning("tracking: the server at %s does not answer (%s); waiting up to %g s for it",
                            uri, brief(e), float(seconds))
            deadline = now + left
            while server_answer(uri, timeout=max(0.5, min(5.0, deadline - time.monotonic()))) is not None:
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            continue
        if since is not None:
            with contextlib.suppress(IndexError):  # another thread may have said it first
                log.info("tracking: the server at %s answers again after %.0f s", uri,
                         time.monotonic() - _LOST_SINCE.pop())
        return result


class Patient:
    """An MlflowClient of a server whose every call waits out an outage of that server
    (``patiently``); attributes that are not public methods are the client's own."""

    def __init__(self, client, uri: str, seconds: float | None) -> None:
        self.client, self.uri, self.seconds = client, uri, seconds

    def __getattr__(self, name: str):
        attr = getattr(self.client, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args, **kwargs):
            return patiently(self.uri, self.seconds, attr, *args, **kwargs)

        call.__name__ = name
        return call


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


def import_code(uri: str) -> None:
    """Import MLflow and the code of the store at ``uri`` (SQLAlchemy and Alembic for a database),
    without opening it: what a process that will write there pays once.

    The imports make about 200,000 objects that live as long as the process; the garbage
    collector, left on, went over them again and again while they were made and after (about 1 s
    of a run). So it pauses for the imports, and what is alive then is frozen out of its reach
    (``gc.freeze``): objects that become garbage later are collected as before."""
    import gc
    import importlib
    import sys

    modules = ["mlflow"] + ([] if uri.startswith(("http://", "https://")) else ["mlflow.store.tracking.sqlalchemy_store"])
    missing = [m for m in modules if m not in sys.modules]
    if not missing:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        for name in missing:
            importlib.import_module(name)
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def client(cfg: DictConfig):
    """An MlflowClient on the configured store (tracking and registry), which must answer; of a
    server, one that waits out an outage of it (``Patient``: tracking.retry_seconds)."""
    uri, _ = store_uri(cfg)
    import_code(uri)
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
    """Fail in one line when the server asks for a login this process does not give, or refuses
    it (MLflow's basic-auth app: make team-up's server), before anything is written."""
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
    """(client, experiment id) of ``experiment`` (default ``tracking.experiment``), created
    with its description if ``create`` and new; runs of this host orphaned by a dead process are
    closed on the way. Without ``create`` a missing experiment is a ConfigError.

    A sweep's jobs that run in one process (Hydra's basic launcher) open a database store once:
    the later ones take the same client and experiment, and leave runs of dead processes to the
    next command. A server is asked each time: one that went away fails a job at once."""
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

def process_tags() -> dict[str, str]:
    """Where this run runs: host, process id and that process's start time (a pid is reused), and
    in a SLURM job its id (``<array job>_<task>`` for a sweep's job, as squeue and sacct name it)."""
    import psutil

    tags = {"catnet.host": socket.gethostname(), "catnet.pid": str(os.getpid()),
            "catnet.pid_started": f"{psutil.Process().create_time():.3f}"}
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        tags[SLURM_TAG] = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    elif os.environ.get("SLURM_JOB_ID"):
        tags[SLURM_TAG] = os.environ["SLURM_JOB_ID"]
    return tags


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
