"""A run's life: created (or continued), its params, metrics and files logged, its status set.

A pipeline execution is one MLflow run. ``open_run`` creates it, or continues the run the
train stage handed over (evaluate stage, when ``dvc repro`` runs the stages as separate
processes), and sets its status honestly: FINISHED only when the last stage succeeded, FAILED
(or KILLED on Ctrl-C / SIGTERM) with the reason as a tag when a stage raised. Per-epoch metrics
are buffered and handed over in batches; a run ends only after they are written. Who writes the
record (this process, or a sweep's record helper) is chosen once, when the run opens
(pipeline/tracking/record.py); a run only calls that interface. Every file a run logs is first
written into a folder private to that run, so what it uploads is its own, whatever else runs
beside it.
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
from pipeline.common import atomic_write, told
from pipeline.tracking import record, store, writer
from pipeline.tracking.names import parent_run_id, provenance_tags, run_name
from pipeline.tracking.record import status_after

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
    def log_model(self, weights: dict, normalizer: dict, example) -> None: ...
    def log_arrays(self, name: str, arrays: dict) -> None: ...
    def log_model_from_files(self, normalizer: dict) -> None: ...
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
    """A tracked run: what the stages log goes to its ``recorder`` (record.Recorder)."""

    def __init__(self, recorder: record.Recorder, run_id: str, tracking_uri: str | None = None):
        super().__init__()
        self.recorder = recorder
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.private = Path(tempfile.mkdtemp(prefix=f"catnet-run-{run_id[:8]}-"))  # this run's files
        self._buffer: list[record.Point] = []
        self.published: list[Path] = []  # the stage outputs it wrote (log_output)
        self._last_send = time.time()
        self._params: dict[str, str] = {}

    @classmethod
    def create(cls, cfg: DictConfig, tags: dict[str, str] | None = None) -> "MlflowRun":
        """A new run of ``cfg``, with its params and composed config."""
        recorder = record.recorder(cfg)
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
        self = cls(recorder, recorder.create(name, tags, int(time.time() * 1000)), store.store_uri(cfg)[0])
        try:
            self._params = {k: v[:6000] for k, v in config.flatten(cfg).items()}
            self._record("params", self._params)
            composed = self.private / "config.yaml"
            composed.write_text(OmegaConf.to_yaml(cfg, resolve=True))
            self._record("log_artifact", str(composed))
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
        direct = record.Direct(resolved)
        client = direct.client
        run_id = info["run_id"]
        try:
            run = client.get_run(run_id)
        except MlflowException:  # another store, or a store made anew: the weights are still valid
            log.warning("tracking: run %s (the train stage's) is not in %s: evaluating its weights in a new run",
                        run_id, client.tracking_uri)
            return cls.create(resolved, tags={"catnet.weights_run_id": run_id})
        if run.info.status == "RUNNING":
            self = cls(direct, run_id, client.tracking_uri)
            self._params = dict(run.data.params)
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
        self._record("inputs", digest, sources)

    def _record(self, kind: str, *args) -> None:
        self.recorder.write(self.run_id, kind, *args)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Buffer one epoch's metrics (a tuple append: training steps can take microseconds);
        every ``recorder.send_seconds`` the buffer is handed over (``send``)."""
        now = time.time()
        for key, value in metrics.items():  # flat tuples of atomic values: the garbage collector
            self._buffer.append((key, value, now, epoch))  # stops tracking them, unlike kept dicts
        if now - self._last_send >= self.recorder.send_seconds:
            self.send()

    def send(self) -> None:
        """Hand the buffered epochs to the recorder, which writes them while the caller trains."""
        if self._buffer:
            self.recorder.points(self.run_id, self._buffer)
            self._buffer = []
        self._last_send = time.time()

    def flush(self) -> None:
        """Send the buffer and wait until what this process writes itself is written (raises if
        writing failed); a sweep's record helper writes the run's end after its points."""
        self.send()
        self.recorder.flush()

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._record("metrics", {k: float(v) for k, v in metrics.items()}, int(time.time() * 1000))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._record("tags", {k: str(v) for k, v in tags.items()})

    def log_output(self, path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
        """Write the file into this run's private folder, publish it as the stage output ``path``
        (whole or not at all), then log it from the private folder: what was trained stays on
        disk even when the store does not take it (``kept``)."""
        private = self.private / path.name
        with open(private, mode) as f:
            write(f)
        atomic_write(path, lambda f: f.write(private.read_bytes()), mode="wb")
        self.published.append(path)
        self._record("log_artifact", str(private))

    def kept(self) -> str:
        """Where this run's trained weights are on disk, for the reason of a run the store lost."""
        weights = [str(p) for p in self.published if p.name == "weights.npz" and p.exists()]
        return f"; its trained weights are kept in {weights[0]}" if weights else ""

    def log_model(self, weights: dict, normalizer: dict, example) -> None:
        """The network as the pyfunc model ``model`` of this run, in its experiment; its URI
        (``models:/<model id>``) goes in the tag catnet.model_uri."""
        self._record("model", str(self.private), weights, normalizer, example, self._params)

    def log_arrays(self, name: str, arrays: dict) -> None:
        """Log named arrays as the artifact ``name`` (a .npz file)."""
        from pipeline.tracking.model import weights_bytes

        path = self.private / name
        path.write_bytes(weights_bytes(arrays))
        self._record("log_artifact", str(path))

    def log_model_from_files(self, normalizer: dict) -> None:
        """A sweep's job: normalizer.npz beside the weights.npz it logged, and the model made from
        the two by whoever writes the run's record (the sweep's helper, while the next job trains,
        if it has one); tag catnet.model_uri."""
        self.log_arrays("normalizer.npz", normalizer)
        self._record("model_from_files", str(self.private), self._params)

    def end(self, status: str, reason: str | None = None) -> None:
        """End the run with ``status`` (record.Recorder.end); its private folder goes once logged.
        RecordLost if the store does not take it; WriterLost if the helper writing it ended (the
        run is FAILED then)."""
        try:
            self.recorder.end(self.run_id, status, reason, str(self.private))
        except writer.WriterLost as lost:
            mark(lost, ended=self.run_id)  # ended FAILED
            raise


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


def job_record(cfg: DictConfig) -> dict:
    """What a failed run of ``cfg`` records (its name, params as given, process tags), for the
    sweep to record when this job could not (parent.settle)."""
    try:
        params = {k: v[:6000] for k, v in config.flatten(cfg, resolve=False).items()}
    except Exception:  # noqa: BLE001 - a config that cannot even be flattened: its name is enough
        params = {}
    return {"name": run_name(cfg), "params": params, "tags": {**provenance_tags(), **store.process_tags()}}


def failed_run(cfg: DictConfig, error: BaseException) -> str | None:
    """Record a job that failed before its run could start (a bad value, say): a FAILED run
    with the reason, its params as given. None when the store cannot be reached."""
    try:
        tags = {"mlflow.source.name": "pipeline", "catnet.failure": f"{type(error).__name__}: {told(error)}"[:5000],
                **provenance_tags(), **store.process_tags()}
        if parent := parent_run_id():
            tags["mlflow.parentRunId"] = parent
        recorder = record.recorder(cfg)  # a sweep's helper says at the sweep's end if it could not record it
        run_id = recorder.create(run_name(cfg), tags, int(time.time() * 1000))
        try:
            recorder.write(run_id, "params", {k: v[:6000] for k, v in config.flatten(cfg, resolve=False).items()})
        finally:
            recorder.end(run_id, "FAILED")
        return run_id
    except writer.RecordError:  # the sweep's helper could not open the store: the sweep's end says so
        return None
    except Exception as e:  # noqa: BLE001 - the store is down or the config unusable: the log says it
        log.error("tracking: could not record the failed job (%s); the sweep records it if the store answers "
                  "by its end", store.brief(e))
        return None


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
