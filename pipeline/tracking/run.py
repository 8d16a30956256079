"""A run as the stages write it: its params, per-epoch metrics (buffered, one ``log_batch`` every
``tracking.flush_seconds``), files, model and status. Every run is written the same way, by its own
process's MLflow client: a single run, a DVC stage, a job of any sweep on any launcher. Each file is
first written into a folder private to the run, so what it uploads is its own."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from catnet.errors import TrialPruned
from pipeline import config
from pipeline.common import Terminated, atomic_write, told
from pipeline import provenance
from pipeline.tracking import store
from pipeline.provenance import parent_run_id, provenance_tags, run_name

log = logging.getLogger("catnet")
PRUNED_TAG = "catnet.pruned_step"  # a run an Optuna search's pruner stopped (KILLED): at which step


class NullRun:
    """What the stages log to when ``tracking.enabled=false``: nothing; outputs are written."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def __init__(self) -> None:
        self._later: list[tuple[Path, Callable[[], bytes]]] = []

    def record_data(self, digest: str, sources: dict[str, str]) -> None: ...
    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None: ...
    def log_metrics(self, metrics: dict[str, float]) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_model(self, weights: dict, normalizer: dict, example=None) -> None: ...
    def send(self) -> None: ...
    def flush(self) -> None: ...
    def end(self, status: str, reason: str | None = None) -> None: ...

    def log_output(self, path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
        """Write a stage output (whole or not at all) and, when tracked, log it as an artifact."""
        atomic_write(path, write, mode)

    def log_output_later(self, path: Path, make: Callable[[], bytes]) -> None:
        """An output whose bytes are still being made (the learning curve, drawn by another
        process): written and logged by ``complete``, when the stages inside the run's block are
        done, before the run ends; never if they failed."""
        self._later.append((path, make))

    def complete(self) -> None:
        while self._later:
            path, make = self._later.pop(0)
            data = make()
            self.log_output(path, lambda f: f.write(data))



class MlflowRun(NullRun):
    """A tracked run, written by this process's MLflow client (``store.client``: of a server, one
    that waits out an outage), the same way for a single run, a DVC stage and any sweep's job."""

    def __init__(self, client, run_id: str, tracking_uri: str | None = None, flush_seconds: float = 10.0):
        super().__init__()
        self.client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.private = Path(tempfile.mkdtemp(prefix=f"catnet-run-{run_id[:8]}-"))  # this run's files
        self.flush_seconds = flush_seconds
        self._buffer: list = []  # (key, value, time, epoch) tuples not yet written
        self.published: list[Path] = []  # the stage outputs it wrote (log_output)
        self._last_send = time.time()
        self._unsent: BaseException | None = None  # why the points of the epochs are not written yet

    @classmethod
    def create(cls, cfg: DictConfig, tags: dict[str, str] | None = None) -> "MlflowRun":
        """A new run of ``cfg``, with its params and composed config."""
        from mlflow.entities import Param

        client, experiment_id = store.open_store(cfg)
        tags = {
            "mlflow.source.name": "pipeline",
            "mlflow.source.type": "LOCAL",
            "catnet.seed": str(cfg.seed),
            **provenance_tags(),
            **provenance.process_tags(),
            **(tags or {}),
        }
        if parent := parent_run_id():
            tags["mlflow.parentRunId"] = parent
        name = run_name(cfg)
        run_id = client.create_run(experiment_id, run_name=name, tags=tags,
                                   start_time=int(time.time() * 1000)).info.run_id
        self = cls(client, run_id, store.store_uri(cfg)[0], float(cfg.tracking.flush_seconds))
        try:
            client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in config.flatten(cfg).items()])
            composed = self.private / "config.yaml"
            composed.write_text(OmegaConf.to_yaml(cfg, resolve=True))
            client.log_artifact(run_id, str(composed))
        except BaseException as e:  # Ctrl-C / SIGTERM here too: a sweep stopped as this job's run starts
            mark(e, ended=self.run_id)
            end_after(self, e, status_after(e), f"{type(e).__name__}: {told(e)}")
            raise
        log.info("tracking: MLflow run %s '%s' in experiment '%s' (%s)", self.run_id, name,
                 cfg.tracking.experiment, self.tracking_uri)
        return self

    def record_data(self, digest: str, sources: dict[str, str]) -> None:
        """The data this run reads, as an MLflow dataset input: the md5 of its arrays as the
        digest (the run's tag catnet.data.md5 too: ``reuse.run_tags``) and the files they came from
        (paths relative to the project)."""
        log_data(self.client, self.run_id, digest, sources)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Buffer one epoch's metrics (a tuple append: training steps can take microseconds);
        every ``tracking.flush_seconds`` the buffer is written (``send``)."""
        now = time.time()
        for key, value in metrics.items():
            self._buffer.append((key, value, now, epoch))
        if now - self._last_send >= self.flush_seconds and self._unsent is None:
            try:
                self.send()
            except Exception as e:  # noqa: BLE001 - training goes on; the points stay, flush() says it
                if not store.unreachable(e):
                    raise
                self._unsent = e  # the server stayed away longer than tracking.retry_seconds

    def send(self) -> None:
        """Write the buffered epochs: one ``log_batch`` (MLflow splits it in requests of 1,000
        points); they stay buffered if the store does not take them."""
        from mlflow.entities import Metric

        if self._buffer:
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), int(t * 1000), step)
                                                        for k, v, t, step in self._buffer])
            self._buffer = []
        self._last_send = time.time()

    def flush(self) -> None:
        """Write what is buffered (one more wait for a server that stayed away while it trained)."""
        self._unsent = None
        self.send()

    def log_metrics(self, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_output(self, path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
        """Write the file into this run's private folder, publish it as the stage output ``path``
        (whole or not at all), then log it from the private folder: what was trained stays on
        disk even when the store does not take it (``kept``)."""
        private = self.private / path.name
        with open(private, mode) as f:
            write(f)
        atomic_write(path, lambda f: f.write(private.read_bytes()), mode="wb")
        self.published.append(path)
        self.client.log_artifact(self.run_id, str(private))

    def kept(self) -> str:
        """Where this run's trained weights are on disk, for the reason of a run the store lost."""
        weights = [str(p) for p in self.published if p.name == "weights.npz" and p.exists()]
        return f"; its trained weights are kept in {weights[0]}" if weights else ""

    def log_model(self, weights: dict, normalizer: dict, example=None) -> None:
        """The network as the pyfunc model ``model`` of this run (pipeline/tracking/model.py); its
        URI (``models:/<model id>``) goes in the tag catnet.model_uri."""
        from pipeline.tracking.model import log_model

        uri = log_model(self.client, self.run_id, self.private, weights, normalizer, example)
        self.set_tags({"catnet.model_uri": uri})

    def end(self, status: str, reason: str | None = None) -> None:
        """End the run with ``status`` (the reason in tag catnet.failure); its private folder goes.
        RecordLost if the store does not take it."""
        try:
            if reason:
                self.client.set_tag(self.run_id, "catnet.failure", reason[:5000])
            self.client.set_terminated(self.run_id, status)
        except Exception as e:  # noqa: BLE001 - the server is gone: say which run stays RUNNING
            raise store.RecordLost(self.run_id, status, e) from e
        finally:
            shutil.rmtree(self.private, ignore_errors=True)


def status_after(error: BaseException) -> str:
    """The status of a run that ``error`` stopped: KILLED for Ctrl-C / SIGTERM and for a search's
    pruner, else FAILED."""
    return "KILLED" if isinstance(error, (KeyboardInterrupt, Terminated, TrialPruned)) else "FAILED"


UNIQUE_VIOLATIONS = ("UNIQUE constraint failed", "duplicate key value violates unique constraint", "Duplicate entry")


def log_data(client, run_id: str, digest: str, sources: dict[str, str], attempts: int = 5) -> None:
    """The dataset input of a run: ``client.log_inputs``, retried when a parallel job inserted the
    same dataset first (MLflow's SQL store looks it up, then inserts it: two first runs on one
    store can both insert it and one fails on the UNIQUE constraint of SQLite, PostgreSQL or
    MySQL; on retry it finds the row and links it)."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    dataset = Dataset(name="catvnoncat", digest=digest, source_type="local", source=json.dumps(sources))
    inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, inputs)
            return
        except MlflowException as e:
            if not any(m in str(e) for m in UNIQUE_VIOLATIONS) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


class ServerLost(store.ServerUnreachable):
    """A run's record that the tracking server did not take within tracking.retry_seconds."""


def end_after(run: MlflowRun, error: BaseException, status: str, reason: str) -> None:
    """End ``run`` because ``error`` stopped it; if the store does not take the status, the
    error carries the run's id as unfinished (the sweep names it, or closes it later)."""
    try:
        run.end(status, reason)
    except store.RecordLost as lost:
        log.error("tracking: %s", lost)
        mark(error, unfinished=run.run_id)


# What an error that stopped a run carries of it (the error may be anyone's: Ctrl-C, an OSError of
# MLflow's): ``mark`` writes it, ``recorded`` and ``unfinished`` read it; store.RecordLost carries both.
def mark(error: BaseException, *, ended: str | None = None, unfinished: str | None = None) -> None:
    """``error`` ``ended`` run <id> (FAILED or KILLED with the reason: no other run is made for this
    failure), or left run <id> ``unfinished`` (RUNNING: the store did not take its status)."""
    if ended is not None:
        error.catnet_run = ended
    if unfinished is not None:
        error.catnet_unfinished = unfinished


def unfinished(error: BaseException) -> str | None:
    """The id of the run ``error`` left RUNNING because the store did not take its status."""
    return error.run_id if isinstance(error, store.RecordLost) else getattr(error, "catnet_unfinished", None)


def recorded(error: BaseException) -> bool:
    """Whether ``error`` ended a run (which is then FAILED or KILLED with the reason)."""
    return isinstance(error, store.RecordLost) or hasattr(error, "catnet_run")
