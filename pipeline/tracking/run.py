"""A run's life: created (or continued), its params, metrics and files logged, its status set.

A pipeline execution is one MLflow run. ``open_run`` creates it, or continues the run the
train stage handed over (evaluate stage, when ``dvc repro`` runs the stages as separate
processes), and sets its status honestly: FINISHED only when the last stage succeeded, FAILED
(or KILLED on Ctrl-C / SIGTERM) with the reason as a tag when a stage raised. Per-epoch metrics
are buffered and written in batches (``log_batch``); a run ends only after they are written.
Every run is written the same way, by its own process's MLflow client: a single run, a DVC
stage, a job of any sweep on any launcher. Every file a run logs is first written into a folder
private to that run, so what it uploads is its own, whatever else runs beside it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from catnet.errors import ConfigError, TrainingDiverged, TrialPruned
from pipeline import config
from pipeline.common import Terminated, atomic_write, told
from pipeline.tracking import store
from pipeline.tracking.names import parent_run_id, provenance_tags, run_name

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
            **store.process_tags(),
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
            _end_after(self, e, status_after(e), f"{type(e).__name__}: {told(e)}")
            raise
        log.info("tracking: MLflow run %s '%s' in experiment '%s' (%s)", self.run_id, name,
                 cfg.tracking.experiment, self.tracking_uri)
        return self

    @classmethod
    def continue_(cls, cfg: DictConfig, info: dict) -> "MlflowRun":
        """The run the train stage handed over (``info``: its run id and tracking URI), if it is
        still RUNNING. If an earlier evaluate already closed it (``dvc repro`` re-ran evaluate
        alone), or the store no longer has it, a new run evaluates the same weights (tag
        ``catnet.weights_run_id``). A run whose training did not succeed is never continued."""
        from mlflow.exceptions import MlflowException

        resolved = OmegaConf.merge(cfg, {"tracking": {"uri": info.get("tracking_uri")}})
        client, _ = store.open_store(resolved)
        run_id = info["run_id"]
        try:
            run = client.get_run(run_id)
        except MlflowException:  # another store, or a store made anew: the weights are still valid
            log.warning("tracking: run %s (the train stage's) is not in %s: evaluating its weights in a new run",
                        run_id, client.tracking_uri)
            return cls.create(resolved, tags={"catnet.weights_run_id": run_id})
        if run.info.status == "RUNNING":
            self = cls(client, run_id, client.tracking_uri, float(cfg.tracking.flush_seconds))
            if store.HANDOFF_TAG in run.data.tags:
                client.delete_tag(run_id, store.HANDOFF_TAG)
            self.set_tags(store.process_tags())
            return self
        if run.data.tags.get("catnet.trained") != "true":
            raise ConfigError(f"MLflow run {run_id} is {run.info.status} and its training did not succeed; "
                              "re-run training: dvc repro --force train")
        self = cls.create(resolved, tags={"catnet.weights_run_id": run_id,
                                          "catnet.data.md5": run.data.tags.get("catnet.data.md5", "")})
        log.info("tracking: run %s is %s already: evaluating its weights in a new run", run_id, run.info.status)
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


def _lost(run: MlflowRun, error: BaseException) -> ServerLost:
    """``error`` (the server did not answer) as one line that says where the trained weights are
    kept, carrying what ``error`` carried of the run."""
    lost = ServerLost(f"MLflow run {run.run_id}: the tracking server did not answer ({store.brief(error)})"
                      f"{run.kept()}")
    lost.__cause__ = error
    mark(lost, ended=run.run_id)
    return lost


def _end_after(run: MlflowRun, error: BaseException, status: str, reason: str) -> None:
    """End ``run`` because ``error`` stopped it; if the store does not take the status, the
    error carries the run's id as unfinished (the sweep names it, or closes it later)."""
    try:
        run.end(status, reason)
    except store.RecordLost as lost:
        log.error("tracking: %s", lost)
        mark(error, unfinished=run.run_id)


# What an error that stopped a run carries of that run. The error may be anyone's (Ctrl-C, an
# OSError of MLflow's, a library's): ``mark`` is the one place that writes these attributes on it,
# ``recorded`` and ``unfinished`` read them; store.RecordLost, catnet's own, carries both from birth.
_ENDED, _UNFINISHED = "_catnet_run_id", "_catnet_unfinished"


def mark(error: BaseException, *, ended: str | None = None, unfinished: str | None = None) -> None:
    """``error`` ``ended`` run <id> (FAILED or KILLED with the reason: no other run is made for this
    failure), or left run <id> ``unfinished`` (RUNNING: the store did not take its status)."""
    if ended is not None:
        setattr(error, _ENDED, ended)
    if unfinished is not None:
        setattr(error, _UNFINISHED, unfinished)


def unfinished(error: BaseException) -> str | None:
    """The id of the run ``error`` left RUNNING because the store did not take its status."""
    if isinstance(error, store.RecordLost):
        return error.run_id
    return getattr(error, _UNFINISHED, None)


UNIQUE_VIOLATIONS = ("UNIQUE constraint failed", "duplicate key value violates unique constraint", "Duplicate entry")


def recorded(error: BaseException) -> bool:
    """Whether ``error`` ended a run (which is then FAILED or KILLED with the reason)."""
    return isinstance(error, store.RecordLost) or getattr(error, _ENDED, None) is not None


def supersede(cfg: DictConfig, previous: dict) -> None:
    """The train stage runs again: its previous run, if still waiting for evaluate (handoff),
    will never be continued (its weights are replaced). KILLED, with the reason."""
    try:
        client, _ = store.open_store(OmegaConf.merge(cfg, {"tracking": {"uri": previous.get("tracking_uri")}}))
        run = client.get_run(previous["run_id"])
    except Exception:  # noqa: BLE001 - another store, or gone: nothing to close
        return
    if run.info.status == "RUNNING" and store.HANDOFF_TAG in run.data.tags:
        client.set_tag(run.info.run_id, "catnet.failure",
                       "superseded: the train stage ran again before the evaluate stage continued this run")
        client.set_terminated(run.info.run_id, "KILLED")


@contextmanager
def open_run(cfg: DictConfig, *, resume: dict | None = None, finish: bool = True,
             tags: dict[str, str] | None = None) -> Iterator[NullRun]:
    """The run the stages inside the block log to.

    ``resume``: the run info the train stage wrote ({'run_id', 'tracking_uri'}), to continue
    that run instead of creating one. ``tags``: the new run's, written with it (one write less
    per run than setting them after). On success the run is FINISHED if ``finish``, else left
    RUNNING for the next stage (tag ``catnet.handoff``, so that no later command takes it for
    an orphan). On any exception it is FAILED (KILLED for Ctrl-C / SIGTERM) and the reason is
    tagged ``catnet.failure``; the exception propagates.
    """
    if not cfg.tracking.enabled or (resume is not None and not resume.get("run_id")):  # or training ran untracked
        untracked = NullRun()
        yield untracked
        untracked.complete()
        return
    run = MlflowRun.continue_(cfg, resume) if resume is not None else MlflowRun.create(cfg, tags)
    try:
        yield run
        run.complete()
        run.flush()
    except BaseException as e:
        status = status_after(e)
        mark(e, ended=run.run_id)
        lost = store.unreachable(e)
        if lost:  # the server stayed away longer than tracking.retry_seconds: one line, and what is kept
            e = _lost(run, e)
        try:
            if not lost:
                run.flush()
            if isinstance(e, TrainingDiverged):
                run.set_tags({"catnet.diverged_epoch": str(e.epoch)})
            elif isinstance(e, TrialPruned):
                run.set_tags({PRUNED_TAG: str(e.step)})
        except Exception as unsent:  # noqa: BLE001 - the store is down: the status is what matters now
            log.error("tracking: run %s: its last points could not be written (%s)", run.run_id, store.brief(unsent))
        _end_after(run, e, status, f"{type(e).__name__}: {told(e)}")
        if lost:
            raise e from e.__cause__
        raise
    if finish:
        run.end("FINISHED")
    else:
        run.set_tags({store.HANDOFF_TAG: "evaluate"})
        shutil.rmtree(run.private, ignore_errors=True)
