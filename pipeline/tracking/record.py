"""What a run records, and the two ways it is written.

A run (a job's, a reused job's link, a failed job's) records the same things: it is created, its
params, files, metrics and tags are written (``write_to``: one function for every kind), its
epochs' points, and last its end. ``Recorder`` is that interface; ``recorder(cfg)`` chooses, once
when the run opens, who writes it:

- ``Direct``: an MLflow client in this process (points by a background thread, so the caller
  goes on training); what a single run, a server's sweep and the DVC stages use;
- ``Handed``: the sweep's record helper (pipeline/tracking/writer.py), which writes it in another
  process while the next job trains. If the helper ends, ``Handed`` takes the run over with a
  ``Direct`` of its own: the run is made if the helper had not made it, and ends FAILED with why.

The stages (pipeline/tracking/run.py) and the reuse of jobs (reuse.py) only call the interface.
"""

from __future__ import annotations

import shutil
import time
import uuid

from omegaconf import DictConfig

from catnet.errors import TrialPruned
from pipeline.common import Terminated, told
from pipeline.tracking import model as tracking_model
from pipeline.tracking import points as tracking_points
from pipeline.tracking import query, store, writer

Point = tuple[str, float, float, int]  # (key, value, time, epoch)
UNIQUE_VIOLATIONS = ("UNIQUE constraint failed", "duplicate key value violates unique constraint", "Duplicate entry")


def status_after(error: BaseException) -> str:
    """The status of a run that ``error`` stopped: KILLED for Ctrl-C / SIGTERM and for a search's
    pruner, else FAILED."""
    return "KILLED" if isinstance(error, (KeyboardInterrupt, Terminated, TrialPruned)) else "FAILED"


class Recorder:
    """Who writes a run's record. ``send_seconds``: how often a training run hands over its
    buffered epochs (at least; ``tracking.flush_seconds`` at most)."""

    send_seconds = float("inf")

    def create(self, name: str, tags: dict[str, str], start: int) -> str:
        """A new RUNNING run of the configured experiment; its id."""
        raise NotImplementedError

    def write(self, run_id: str, kind: str, *args) -> None:
        """Write ``kind`` of the run's record (``write_to``), after what was written before."""
        raise NotImplementedError

    def points(self, run_id: str, points: list[Point]) -> None:
        """Write epoch points, without making the caller wait."""
        raise NotImplementedError

    def flush(self) -> None:
        """Wait for what this process is still writing itself (raises if it failed)."""

    def end(self, run_id: str, status: str, reason: str | None = None, folder: str | None = None) -> None:
        """End the run with ``status`` (the reason in tag catnet.failure) once everything before
        is written; then remove ``folder`` (its private files, logged by then). RecordLost if
        the store did not take the status; WriterLost (the run FAILED) if the helper ended."""
        raise NotImplementedError

    def find(self, key: str) -> query.Earlier | None:
        """The earliest FINISHED run of the experiment that trained with identity ``key``."""
        raise NotImplementedError


class Direct(Recorder):
    """The run's record written by an MLflow client in this process."""

    def __init__(self, cfg: DictConfig, flush_seconds: float | None = None) -> None:
        self.cfg = cfg
        self.send_seconds = float(cfg.tracking.flush_seconds if flush_seconds is None else flush_seconds)
        self._client = None
        self.experiment_id: str | None = None
        self._thread = None  # writes the points in the background, started by the first
        self._pending: list = []  # its futures not yet waited for

    @property
    def client(self):
        """The client of the configured store (opened now, the experiment made if new: this
        imports MLflow, store.import_code)."""
        if self._client is None:
            self._client, self.experiment_id = store.open_store(self.cfg)
        return self._client

    def create(self, name: str, tags: dict[str, str], start: int) -> str:
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags, start_time=start).info.run_id

    def adopt(self, run_id: str, name: str, tags: dict[str, str], start: int, params: dict[str, str]) -> None:
        """Make run ``run_id`` (its id chosen by its job) with its params, unless it exists."""
        if tracking_points.create_run(self.client, run_id, self.experiment_id, name, tags, start):
            write_to(self.client, run_id, "params", params)

    def write(self, run_id: str, kind: str, *args) -> None:
        write_to(self.client, run_id, kind, *args)

    def points(self, run_id: str, points: list[Point]) -> None:
        if self._thread is None:
            from concurrent.futures import ThreadPoolExecutor

            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catnet-mlflow")
        self._pending.append(self._thread.submit(tracking_points.write, self.client, run_id, points))

    def flush(self) -> None:
        """Wait for the points sent; the thread then ends (a joblib worker runs many jobs)."""
        pending, self._pending = self._pending, []
        try:
            for future in pending:
                future.result()
        finally:
            if self._thread is not None:
                self._thread.shutdown(wait=True)
                self._thread = None

    def end(self, run_id: str, status: str, reason: str | None = None, folder: str | None = None) -> None:
        try:
            if reason:
                self.client.set_tag(run_id, "catnet.failure", reason[:5000])
            self.client.set_terminated(run_id, status)
        except Exception as e:  # noqa: BLE001 - the server is gone: say which run stays RUNNING
            raise store.RecordLost(run_id, status, e) from e
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    def find(self, key: str) -> query.Earlier | None:
        return query.identical(self.client, self.experiment_id, key)


class Handed(Recorder):
    """The run's record handed to the sweep's record helper, which writes it in order."""

    def __init__(self, helper: writer.Helper, cfg: DictConfig) -> None:
        self.helper, self.cfg = helper, cfg
        self.send_seconds = min(float(cfg.tracking.flush_seconds), helper.send_seconds)
        self.made: dict[str, tuple] = {}  # run id -> (name, tags, start, params): to make it here if the helper ends
        self.direct: Direct | None = None

    def create(self, name: str, tags: dict[str, str], start: int) -> str:
        run_id = uuid.uuid4().hex
        self.made[run_id] = (name, tags, start, {})
        self.helper.create(run_id, self.cfg.tracking.experiment, name, tags, start)
        return run_id

    def write(self, run_id: str, kind: str, *args) -> None:
        if kind == "params" and run_id in self.made:
            self.made[run_id][3].update(args[0])
        self.helper.call(run_id, kind, *args)

    def points(self, run_id: str, points: list[Point]) -> None:
        self.helper.send(run_id, points)

    def end(self, run_id: str, status: str, reason: str | None = None, folder: str | None = None) -> None:
        """The run ends now (its end time), though its record is written later. If the helper
        ended, what it was handed may be lost: the run is made here if need be and FAILED."""
        try:
            self.helper.end(run_id, status, reason, folder, int(time.time() * 1000))
            return
        except writer.WriterLost as e:
            lost: writer.WriterLost | None = e
        if told(lost) not in (reason or ""):  # the run may be ending for that very reason
            reason = "; ".join(filter(None, [reason, told(lost)]))
        if status == "FINISHED":
            status = "FAILED"
        else:
            lost = None  # the run fails anyway, with both reasons
        direct = self._take_over()
        if run_id in self.made:
            direct.adopt(run_id, *self.made[run_id])
        direct.end(run_id, status, reason, folder)
        if lost is not None:
            raise lost

    def find(self, key: str) -> query.Earlier | None:
        try:
            return self.helper.ask("find", self.cfg.tracking.experiment, key)
        except writer.WriterLost:
            return self._take_over().find(key)

    def _take_over(self) -> Direct:
        if self.direct is None:
            writer.lost()  # the sweep's process takes the parent over
            self.direct = Direct(self.cfg)
        return self.direct


def recorder(cfg: DictConfig) -> Recorder:
    """Who writes the record of a run of ``cfg``: the sweep's record helper, if this process
    has one for the configured store, else this process. RecordError if the helper could not
    open the store."""
    helper = writer.for_store(store.store_uri(cfg)[0])
    if helper is None:
        return Direct(cfg)
    if fatal := helper.failed():
        raise writer.RecordError(fatal)
    return Handed(helper, cfg)


def write_to(client, run_id: str, kind: str, *args) -> None:
    """Write ``kind`` of run ``run_id``'s record with ``client``, in this process or in a sweep's
    record helper. The kinds a job hands over are plain values, so that a job whose helper writes
    them never imports MLflow: ``params`` ({name: value}), ``metrics`` ({name: value}, time in
    ms), ``tags`` ({name: value}), ``batch`` (params, metrics and tags at once: {"params": {},
    "metrics": [(k, v, ms)], "tags": {}}), ``inputs`` (the data's digest, {split: file}: an
    MLflow dataset input), ``log_artifact`` (a file), ``model`` (the network's arrays as the
    run's model), ``model_from_files`` (the model made from the run's logged .npz files)."""
    from mlflow.entities import Metric, Param, RunTag

    if kind == "batch":
        batch = args[0]
        client.log_batch(run_id, params=[Param(k, v) for k, v in batch["params"].items()],
                         metrics=[Metric(k, float(v), t, 0) for k, v, t in batch["metrics"]],
                         tags=[RunTag(k, v) for k, v in batch["tags"].items()])
    elif kind == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in args[0].items()])
    elif kind == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, float(v), args[1], 0) for k, v in args[0].items()])
    elif kind == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in args[0].items()])
    elif kind == "inputs":
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        digest, sources = args
        dataset = Dataset(name="catvnoncat", digest=digest, source_type="local", source=json.dumps(sources))
        _log_inputs(client, run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
    elif kind == "log_artifact":
        client.log_artifact(run_id, *args)
    elif kind == "model":  # (folder, weights, normalizer, example, params): its URI in tag catnet.model_uri
        folder, weights, normalizer, example, params = args
        from pathlib import Path

        uri = tracking_model.log_model(client, run_id, client.get_run(run_id).info.experiment_id, Path(folder),
                                       weights, normalizer, example, params)
        client.set_tag(run_id, "catnet.model_uri", uri)
    elif kind == "model_from_files":  # (folder, params): the folder its weights.npz and normalizer.npz came from
        tracking_model.log_from_files(client, run_id, *args)
    else:
        raise ValueError(f"no such kind of record: {kind!r}")


def _log_inputs(client, run_id: str, inputs: list, attempts: int = 5) -> None:
    """client.log_inputs, retried when a parallel job inserted the same dataset first: MLflow's
    SQL store looks the dataset up, then inserts it, so two first runs on one store can both
    insert it and one fails on the UNIQUE constraint; on retry it finds the row and links it.
    The message is the database's: SQLite, PostgreSQL (a server on it: README, Team mode), MySQL.
    Also retried: a server that died in the middle of the request (MLflow retries a POST that
    could not connect, not one cut off mid-answer), which may or may not have linked the input;
    MLflow's log_inputs skips an input the run has already, so asking again is safe, and the
    retry waits for the server as every request does (tracking.retry_seconds)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, inputs)
            return
        except Exception as e:  # noqa: BLE001 - only the two cases below are retried
            duplicate = isinstance(e, MlflowException) and any(m in str(e) for m in UNIQUE_VIOLATIONS)
            if not (duplicate or store.unreachable(e)) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
