"""The one place that talks to MLflow.

A pipeline execution is one MLflow run. ``open_run`` creates it (train stage) or re-opens it
by id (evaluate stage, when ``dvc repro`` runs the stages as separate processes), and sets its
status honestly: FINISHED only when the last stage succeeded, FAILED (or KILLED on Ctrl-C)
with the reason as a tag when a stage raised. Per-epoch metrics are buffered and sent in
batches by a background thread; a run ends only after they are written.
``mlflow`` is imported only when tracking is on: it costs over a second.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from catnet.data import dvc_digest
from catnet.errors import ConfigError, TrainingDiverged
from pipeline import config
from pipeline.common import ROOT, Terminated, resolve
from pipeline.sweep import PARENT_ENV, SWEPT_ENV

log = logging.getLogger("catnet")


class NullRun:
    """What the stages log to when ``tracking.enabled=false``: nothing."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...
    def log_metrics(self, metrics: dict[str, float]) -> None: ...
    def log_artifact(self, path: Path) -> None: ...
    def log_model(self, weights: Path, normalizer: Path, cfg: DictConfig, example) -> None: ...
    def send(self) -> None: ...
    def flush(self) -> None: ...
    def end(self, status: str, reason: str | None = None) -> None: ...


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


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _run_name(cfg: DictConfig) -> str | None:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("tracking.", "paths.", "hydra"))]
        swept = os.environ.get(SWEPT_ENV)
        if swept:  # a sweep's child: named by the values it sweeps
            overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept.split(",")]
        if overrides:
            return " ".join(overrides)[:250]
    return None


def _log_inputs(client, run_id: str, inputs: list, attempts: int = 5) -> None:
    """client.log_inputs, retried when a parallel job inserted the same dataset first: MLflow's
    SQL store looks the dataset up, then inserts it, so two first runs on one store can both
    insert it and one fails on the UNIQUE constraint; on retry it finds the row and links it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, inputs)
            return
        except MlflowException as e:
            if "UNIQUE constraint failed" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


class MlflowRun(NullRun):
    def __init__(self, client, run_id: str, tracking_uri: str, flush_seconds: float):
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.flush_seconds = flush_seconds
        self._buffer: list[tuple[str, float, float, int]] = []  # (key, value, time, epoch)
        self._pending: list = []  # futures of writes not yet waited for
        self._writer = None  # the background thread, started by the first send
        self._last_send = time.time()

    @classmethod
    def create(cls, cfg: DictConfig) -> "MlflowRun":
        from mlflow.entities import Dataset, DatasetInput, InputTag, Param

        client, experiment_id = client_and_experiment(cfg)
        data_files = [resolve(cfg.data.train_path), resolve(cfg.data.test_path)]
        digest = dvc_digest(data_files)
        tags = {
            "mlflow.source.name": "pipeline",
            "mlflow.source.type": "LOCAL",
            "catnet.data.md5": digest,
            "catnet.seed": str(cfg.seed),
            **provenance_tags(),
        }
        parent = os.environ.get(PARENT_ENV)
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = client.create_run(experiment_id, run_name=_run_name(cfg), tags=tags)
        run_id = run.info.run_id
        try:
            params = [Param(k, v[:6000]) for k, v in config.flatten(cfg).items()]
            client.log_batch(run_id, params=params)
            client.log_text(run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            source = json.dumps({"train": str(data_files[0]), "test": str(data_files[1])})
            dataset = Dataset(name=data_files[0].parent.name or "data", digest=digest,
                              source_type="local", source=source)
            _log_inputs(client, run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
        except BaseException as e:
            client.set_tag(run_id, "catnet.failure", f"{type(e).__name__}: {e}"[:5000])
            client.set_terminated(run_id, "FAILED")
            raise
        log.info("tracking: MLflow run %s in experiment '%s' (%s)", run_id, cfg.tracking.experiment,
                 client.tracking_uri)
        return cls(client, run_id, client.tracking_uri, cfg.tracking.flush_seconds)

    @classmethod
    def attach(cls, cfg: DictConfig, run_id: str, tracking_uri: str) -> "MlflowRun":
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=tracking_uri)
        try:
            client.get_run(run_id)
        except MlflowException:
            raise ConfigError(
                f"MLflow run {run_id} (written by the train stage) is not in {tracking_uri}; "
                "re-run training: dvc repro --force train"
            ) from None
        return cls(client, run_id, tracking_uri, cfg.tracking.flush_seconds)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Buffer one epoch's metrics (a tuple append: training steps can take microseconds);
        every ``flush_seconds`` the buffer goes to MLflow in the background (``send``)."""
        now = time.time()
        for key, value in metrics.items():  # flat tuples of atomic values: the garbage collector
            self._buffer.append((key, value, now, epoch))  # stops tracking them, unlike kept dicts
        if now - self._last_send >= self.flush_seconds:
            self.send()

    def send(self) -> None:
        """Hand the buffered epochs to a background thread that writes them to MLflow (in
        batches of 1000), so the caller goes on training; ``flush`` waits for it."""
        if self._buffer:
            if self._writer is None:
                from concurrent.futures import ThreadPoolExecutor

                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catnet-mlflow")
            self._pending.append(self._writer.submit(self._write, self._buffer))
            self._buffer = []
        self._last_send = time.time()

    def _write(self, points: list[tuple[str, float, float, int]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, float(value), int(t * 1000), epoch) for key, value, t, epoch in points]
        self.client.log_batch(self.run_id, metrics=metrics)

    def flush(self) -> None:
        """Send the buffer and wait until everything sent is written (raises if writing failed);
        the writer thread then ends (a joblib worker runs many jobs, one run each)."""
        self.send()
        pending, self._pending = self._pending, []
        try:
            for future in pending:
                future.result()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_model(self, weights: Path, normalizer: Path, cfg: DictConfig, example) -> None:
        """The network as a pyfunc model ``model`` of this run (pipeline/mlflow_model.py),
        with a signature and an input example; its URI goes in the tag catnet.model_uri."""
        import mlflow
        import numpy
        import pandas
        from mlflow.models import Model, infer_signature

        mlflow.set_tracking_uri(self.tracking_uri)
        quiet_model_warnings()
        # MLflow re-reads the model it just logged to check the input example, with a download
        # progress bar per file: noise in a stage's log (a user's own setting wins)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        signature = infer_signature(example, pandas.DataFrame(
            {"probability": numpy.zeros(len(example)), "label": numpy.zeros(len(example), numpy.int64)}))
        info = Model.log(
            artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=self.run_id,
            python_model=str(ROOT / "pipeline" / "mlflow_model.py"),
            artifacts={"weights": str(weights), "normalizer": str(normalizer)},
            code_paths=[str(ROOT / "src" / "catnet")],
            model_config={"activation": cfg.model.activation, "dtype": cfg.train.dtype,
                          "image_shape": list(cfg.data.image_shape)},
            signature=signature, input_example=example,
            pip_requirements=[f"numpy=={numpy.__version__}", f"pandas=={pandas.__version__}",
                              f"mlflow=={mlflow.__version__}"],
        )
        self.client.set_tag(self.run_id, "catnet.model_uri", info.model_uri)

    def end(self, status: str, reason: str | None = None) -> None:
        if reason:
            self.client.set_tag(self.run_id, "catnet.failure", reason[:5000])
        self.client.set_terminated(self.run_id, status)


def quiet_model_warnings() -> None:
    """Drop two MLflow hints that do not apply here: "add type hints to predict" (the model
    validates its input itself) and "integer column(s)" (the label column is never missing).
    MLflow re-enables UserWarnings inside its own calls (a "once" filter put in front of ours),
    so a filter cannot do it; the display hook can."""
    import warnings

    if getattr(warnings.showwarning, "_catnet", False):
        return
    shown = warnings.showwarning
    hints = ("type hints to the `predict` method", "Inferred schema contains integer column")

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if not any(h in str(message) for h in hints):
            shown(message, category, filename, lineno, file, line)

    showwarning._catnet = True
    warnings.showwarning = showwarning


def provenance_tags() -> dict[str, str]:
    """What it takes to reproduce a run: the code's commit and the package versions."""
    import importlib.metadata as md

    versions = ", ".join(f"{p} {md.version(p)}" for p in ("numpy", "h5py", "hydra-core", "mlflow"))
    tags = {"catnet.versions": f"python {platform.python_version()}, {versions}"}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["catnet.git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    return tags


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


def client_and_experiment(cfg: DictConfig):
    """An MlflowClient on the configured store (created if new) and the experiment's id."""
    from mlflow import MlflowClient

    uri, artifact_root = store_uri(cfg)
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    client = MlflowClient(tracking_uri=uri)
    return client, _experiment_id(client, cfg.tracking.experiment, artifact_root)


def _experiment_id(client, name: str, artifact_root: Path | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = (artifact_root / name).as_uri() if artifact_root else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by a parallel job
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise ConfigError(f"tracking.experiment={name!r}: this experiment is deleted; restore it or pick another name")
    return exp.experiment_id


@contextmanager
def open_run(cfg: DictConfig, *, resume: dict | None = None, finish: bool = True) -> Iterator[NullRun]:
    """The run the stages inside the block log to.

    ``resume``: the run info the train stage wrote ({'run_id', 'tracking_uri'}), to continue
    that run instead of creating one. On success the run is FINISHED if ``finish``, else left
    RUNNING for the next stage. On any exception it is FAILED (KILLED for Ctrl-C) and the
    reason is tagged ``catnet.failure``; the exception propagates.
    """
    if not cfg.tracking.enabled:
        yield NullRun()
        return
    if resume is not None:
        if not resume.get("run_id"):  # training ran with tracking off
            yield NullRun()
            return
        uri, _ = store_uri(OmegaConf.merge(cfg, {"tracking": {"uri": resume.get("tracking_uri")}}))
        run = MlflowRun.attach(cfg, resume["run_id"], uri)
    else:
        run = MlflowRun.create(cfg)
    try:
        yield run
        run.flush()
    except BaseException as e:
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, Terminated)) else "FAILED"
        try:
            run.flush()
            if isinstance(e, TrainingDiverged):
                run.client.set_tag(run.run_id, "catnet.diverged_epoch", str(e.epoch))
        finally:
            run.end(status, reason=f"{type(e).__name__}: {e}")
        raise
    if finish:
        run.end("FINISHED")
