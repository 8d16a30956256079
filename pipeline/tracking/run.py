"""A run's life: created (or continued), its params, metrics and files logged, its status set.

A pipeline execution is one MLflow run. ``open_run`` creates it, or continues the run the
train stage handed over (evaluate stage, when ``dvc repro`` runs the stages as separate
processes), and sets its status honestly: FINISHED only when the last stage succeeded, FAILED
(or KILLED on Ctrl-C / SIGTERM) with the reason as a tag when a stage raised. Per-epoch metrics
are buffered and sent in batches by a background thread; a run ends only after they are
written. In a sequential sweep with a record helper (pipeline/tracking/writer.py),
everything a run records after its creation is handed to that process instead, which writes it
in order and ends the run last. Every file a run logs is first written into a folder private to
that run, so what it uploads is its own, whatever else runs beside it.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

from catnet.errors import ConfigError, TrainingDiverged
from pipeline import config
from pipeline.common import ROOT, Terminated, atomic_write, is_multirun, told
from pipeline.tracking import model as tracking_model
from pipeline.tracking import points, store, writer

log = logging.getLogger("catnet")

PARENT_ENV = "CATNET_MLFLOW_PARENT_RUN_ID"
PARENT_FILE_ENV = "CATNET_MLFLOW_PARENT_RUN_FILE"  # where the sweep writes it, for workers started before it
SWEPT_ENV = "CATNET_SWEPT_KEYS"  # the keys the sweep varies: children are named by their values
SHORT_KEYS = {"hidden_sizes": "hidden"}  # names in run names, where the last part of a key is long


def parent_run_id() -> str | None:
    """The id of the sweep's parent run, for a job's run: ``PARENT_ENV``, or, in a worker started
    before the parent existed (joblib's, warmed up while the sweep creates it), the file the sweep
    wrote it in once created (jobs start only after that)."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    path = os.environ.get(PARENT_FILE_ENV)
    if path and os.path.isfile(path):
        return Path(path).read_text().strip() or None
    return None


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


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


_PROVENANCE: dict[str, str] = {}  # a sweep's jobs in one process run the code it imported once


def provenance_tags() -> dict[str, str]:
    """What it takes to reproduce a run: the code's commit and the package versions (asked of
    git once per process in a sweep, whose jobs all run the code the process imported)."""
    if not (_PROVENANCE and is_multirun()):
        _PROVENANCE.clear()
        _PROVENANCE.update(_provenance())
    return dict(_PROVENANCE)


def _provenance() -> dict[str, str]:
    import importlib.metadata as md

    versions = ", ".join(f"{p} {md.version(p)}" for p in ("numpy", "h5py", "hydra-core", "mlflow"))
    tags = {"catnet.versions": f"python {platform.python_version()}, {versions}"}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        # the stages' own results do not make the code dirty: `dvc repro` deletes and rewrites them
        results = [f":(exclude){p}" for p in dvc_results()]
        tags["catnet.git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".",
                                                 *results)))
    if os.environ.get("DVC_EXP_NAME"):
        tags["catnet.dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def dvc_results() -> list[str]:
    """The files the pipeline's stages write (dvc.yaml's outs, metrics and plots) and dvc.lock."""
    import yaml

    try:
        stages = (yaml.safe_load((ROOT / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return []
    paths = ["dvc.lock"]
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind) or []:
                paths.append(next(iter(item)) if isinstance(item, dict) else str(item))
    return paths


def short_value(value: str) -> str:
    """A number of many digits to three significant ones (``2.0876396919207562e-05`` ->
    ``2.09e-05``); anything else as it is."""
    if len(value) <= 7 or not any(c in value for c in ".eE"):
        return value
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


def short_keys(keys: list[str]) -> list[str]:
    """Each key by its last part (``train.lr`` -> ``lr``, ``model.hidden_sizes`` -> ``hidden``),
    unless two would look alike."""
    short = [SHORT_KEYS.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k in keys]
    return [s if short.count(s) == 1 else k for s, k in zip(short, keys)]


def short_name(overrides: list[str]) -> str:
    """``train.lr=0.005 model.hidden_sizes=[64,16] seed=3`` -> ``lr=0.005 hidden=[64,16] seed=3``:
    each key by its last part (``short_keys``), each number short (``short_value``)."""
    pairs = [o.lstrip("+~").split("=", 1) for o in overrides]
    pairs = [(k, v[0] if v else "") for k, *v in pairs]
    names = short_keys([k for k, _ in pairs])
    return " ".join(f"{n}={short_value(v)}" for n, (_, v) in zip(names, pairs))


def run_name(cfg: DictConfig) -> str:
    """``tracking.run_name``, else what differs from the defaults: the command-line overrides
    (in a sweep, the job number and the swept values: ``#3 lr=0.005 hidden=[64,16]``), after the
    DVC experiment's name under ``dvc exp run``; ``default`` when nothing differs."""
    if cfg.tracking.run_name:
        return str(cfg.tracking.run_name)[:250]
    from hydra.core.hydra_config import HydraConfig

    overrides: list[str] = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task
                     if not o.lstrip("+~").startswith(("tracking.", "paths.", "hydra"))]
        swept = [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k]
        if swept:  # a sweep's child: named by the values it sweeps
            overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or overrides
        if parent_run_id():  # after its job number, which the UI's narrow name column keeps
            job = f"#{HydraConfig.get().job.num}"
            return f"{job} {short_name(overrides)}".strip()[:250]
    if os.environ.get("DVC_EXP_NAME") and not overrides:
        overrides = dvc_exp_changes()
    name = " ".join(p for p in (os.environ.get("DVC_EXP_NAME", ""), short_name(overrides)) if p)
    return (name or "default")[:250]


def dvc_exp_changes() -> list[str]:
    """Under ``dvc exp run``, its ``-S`` changes as overrides (``train.lr=0.01``), written as on a
    command line: params.yaml, which DVC composed from conf/ and them, against conf/ alone."""
    import yaml

    from pipeline.params import composed_yaml

    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], yaml.safe_dump(node, default_flow_style=True, width=10**6).strip().removesuffix("\n...")

    try:
        ran = dict(leaves(yaml.safe_load((ROOT / "params.yaml").read_text())))
        default = dict(leaves(yaml.safe_load(composed_yaml())))
    except Exception:  # noqa: BLE001 - a name is not worth failing a run: DVC's name alone then
        return []
    return [f"{k}={v.replace(', ', ',')}" for k, v in ran.items()
            if default.get(k) != v and not k.startswith(("tracking.", "paths.", "hydra"))]


class MlflowRun(NullRun):
    def __init__(self, client, run_id: str, experiment_id: str | None, flush_seconds: float,
                 tracking_uri: str | None = None):
        super().__init__()
        self.client = client  # None while a sweep's helper holds the record (``_take_over``)
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri or client.tracking_uri
        self._made: tuple | None = None  # (cfg, name, tags, start): how the helper was asked to create it
        self.flush_seconds = flush_seconds
        self.private = Path(tempfile.mkdtemp(prefix=f"catnet-run-{run_id[:8]}-"))  # this run's files
        self._buffer: list[tuple[str, float, float, int]] = []  # (key, value, time, epoch)
        self._pending: list = []  # futures of writes not yet waited for
        self._writer = None  # the background thread, started by the first send
        self._last_send = time.time()
        self._params: dict[str, str] = {}
        self._helper = None  # the sweep's record helper (pipeline/tracking/writer.py), if it has one
        self._interval = flush_seconds

    @classmethod
    def create(cls, cfg: DictConfig, tags: dict[str, str] | None = None) -> "MlflowRun":
        """A new run of ``cfg``. In a sweep whose helper holds the record (pipeline/tracking/
        writer.py) the run's id is chosen here and the helper creates it: this process does not
        open the store."""
        uri = store.store_uri(cfg)[0]
        helper = writer.owner(uri)
        if helper is not None and (fatal := helper.failed()):
            raise writer.RecordError(fatal)
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
        if helper is not None:
            import uuid

            self = cls(None, uuid.uuid4().hex, None, cfg.tracking.flush_seconds, tracking_uri=uri)
            self._made = (cfg, name, tags, int(time.time() * 1000))
            helper.hand("create", self.run_id, cfg.tracking.experiment, name, tags, self._made[3])
        else:
            client, experiment_id = store.open_store(cfg)  # it imports MLflow (store.import_code)
            run = client.create_run(experiment_id, run_name=name, tags=tags)
            self = cls(client, run.info.run_id, experiment_id, cfg.tracking.flush_seconds)
        self._helper = helper or writer.for_store(uri)
        if self._helper is not None:
            self._interval = self._helper.send_every(self.flush_seconds)
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

    def _take_over(self):
        """This process's client of the run's store, opened now if the helper held the record
        (it ended): the run is made if the helper had not made it yet, with its params."""
        if self.client is None:
            from pipeline.tracking import points

            cfg, name, tags, start = self._made
            self.client, self.experiment_id = store.open_store(cfg)
            if points.create_run(self.client, self.run_id, self.experiment_id, name, tags, start):
                write_to(self.client, self.run_id, "params", self._params)
        return self.client

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
            self = cls(client, run_id, run.info.experiment_id, cfg.tracking.flush_seconds)
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

    def _record(self, method: str, *args, **kwargs) -> None:
        """``MlflowClient.<method>(run_id, *args, **kwargs)`` (``log_inputs``: with its retries);
        by the sweep's record helper, after what this run handed it before, if it has one."""
        if self._helper is not None:
            self._helper.call(self.run_id, method, *args, **kwargs)
        else:
            write_to(self._take_over(), self.run_id, method, *args, **kwargs)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Buffer one epoch's metrics (a tuple append: training steps can take microseconds);
        every ``flush_seconds`` (``writer.SEND_SECONDS`` with a sweep's record helper)
        the buffer goes to MLflow in the background (``send``)."""
        now = time.time()
        for key, value in metrics.items():  # flat tuples of atomic values: the garbage collector
            self._buffer.append((key, value, now, epoch))  # stops tracking them, unlike kept dicts
        if now - self._last_send >= self._interval:
            self.send()

    def send(self) -> None:
        """Hand the buffered epochs to the sweep's record helper, or else to a background
        thread that writes them to MLflow (``points.write``), so the caller goes on training."""
        if self._buffer and self._helper is not None:
            self._helper.send(self.run_id, self._buffer)
            self._buffer = []
        elif self._buffer:
            if self._writer is None:
                from concurrent.futures import ThreadPoolExecutor

                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="catnet-mlflow")
            self._pending.append(self._writer.submit(points.write, self._take_over(), self.run_id, self._buffer))
            self._buffer = []
        self._last_send = time.time()

    def flush(self) -> None:
        """Send the buffer and wait until everything sent is written (raises if writing failed);
        the writer thread then ends (a joblib worker runs many jobs, one run each). A sweep's
        record helper is not waited for: it writes the run's end after its points."""
        self.send()
        if self._helper is not None:
            return
        pending, self._pending = self._pending, []
        try:
            for future in pending:
                future.result()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self._record("metrics", {k: float(v) for k, v in metrics.items()}, int(time.time() * 1000))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._record("tags", {k: str(v) for k, v in tags.items()})

    def log_output(self, path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
        """Write the file into this run's private folder, log it from there, then publish it as
        the stage output ``path`` (whole or not at all)."""
        private = self.private / path.name
        with open(private, mode) as f:
            write(f)
        self._record("log_artifact", str(private))
        atomic_write(path, lambda f: f.write(private.read_bytes()), mode="wb")

    def log_model(self, weights: dict, normalizer: dict, example) -> None:
        """The network as the pyfunc model ``model`` of this run, in its experiment; its URI
        (``models:/<model id>``) goes in the tag catnet.model_uri."""
        uri = tracking_model.log_model(self._take_over(), self.run_id, self.experiment_id, self.private, weights,
                                       normalizer, example, self._params)
        self.set_tags({"catnet.model_uri": uri})

    def log_arrays(self, name: str, arrays: dict) -> None:
        """Log named arrays as the artifact ``name`` (a .npz file)."""
        path = self.private / name
        path.write_bytes(tracking_model.weights_bytes(arrays))
        self._record("log_artifact", str(path))

    def log_model_from_files(self, normalizer: dict) -> None:
        """A sweep's job: normalizer.npz beside the weights.npz it logged, and the model made from
        the two by the process that writes the run's record (the sweep's helper, while the next
        job trains, if it has one: pipeline/tracking/writer.py); tag catnet.model_uri."""
        self.log_arrays("normalizer.npz", normalizer)
        self._record("model_from_files", str(self.private), self._params)

    def end(self, status: str, reason: str | None = None) -> None:
        """Write the run's final status (MLflow retries within ``tracking.retry_seconds``);
        RecordLost if the store does not take it. With a sweep's record helper, hand it
        over (the process removes the private folder); if the process has ended, what it was
        handed may be lost: the run is FAILED here, and WriterLost raised if it had succeeded."""
        lost = None
        if self._helper is not None:
            try:  # the run ends now, though its record is written later
                self._helper.end(self.run_id, status, reason, str(self.private), int(time.time() * 1000))
                return
            except writer.WriterLost as e:
                self._helper, lost = None, e
                if told(e) not in (reason or ""):  # the run may be ending for that very reason
                    reason = "; ".join(filter(None, [reason, told(e)]))
                if status == "FINISHED":
                    status = "FAILED"
                else:
                    lost = None  # the run fails anyway, with both reasons
        try:
            client = self._take_over()
            if reason:
                client.set_tag(self.run_id, "catnet.failure", reason[:5000])
            client.set_terminated(self.run_id, status)
        except Exception as e:  # noqa: BLE001 - the server is gone: say which run stays RUNNING
            raise store.RecordLost(self.run_id, status, e) from e
        finally:
            shutil.rmtree(self.private, ignore_errors=True)
        if lost is not None:
            mark(lost, ended=self.run_id)  # ended FAILED
            raise lost


def status_after(error: BaseException) -> str:
    """The status of a run that ``error`` stopped: KILLED for Ctrl-C / SIGTERM, else FAILED."""
    return "KILLED" if isinstance(error, (KeyboardInterrupt, Terminated)) else "FAILED"


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


def write_to(client, run_id: str, method: str, *args, **kwargs) -> None:
    """``client.<method>(run_id, *args, **kwargs)``; ``log_inputs`` with its retries (``_log_inputs``).
    What a run records, in this process or in a sweep's record helper. The job's own
    kinds of record are plain values, so that a job whose helper writes them never imports MLflow:
    ``params`` ({name: value}), ``metrics`` ({name: value}, time in ms), ``tags`` ({name: value}),
    ``inputs`` (the data's digest, {split: file}: an MLflow dataset input)."""
    from mlflow.entities import Metric, Param, RunTag

    if method == "batch":  # params, metrics and tags at once: {"params": {}, "metrics": [(k, v, ms)], "tags": {}}
        batch = args[0]
        client.log_batch(run_id, params=[Param(k, v) for k, v in batch["params"].items()],
                         metrics=[Metric(k, float(v), t, 0) for k, v, t in batch["metrics"]],
                         tags=[RunTag(k, v) for k, v in batch["tags"].items()])
    elif method == "params":
        client.log_batch(run_id, params=[Param(k, v) for k, v in args[0].items()])
    elif method == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, float(v), args[1], 0) for k, v in args[0].items()])
    elif method == "tags":
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in args[0].items()])
    elif method == "inputs":
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        digest, sources = args
        dataset = Dataset(name="catvnoncat", digest=digest, source_type="local", source=json.dumps(sources))
        _log_inputs(client, run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])
    elif method == "log_inputs":
        _log_inputs(client, run_id, *args, **kwargs)
    elif method == "model_from_files":  # the folder its weights.npz and normalizer.npz were logged from
        tracking_model.log_from_files(client, run_id, *args)
    else:
        getattr(client, method)(run_id, *args, **kwargs)


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
        helper = writer.owner(store.store_uri(cfg)[0])
        if helper is not None:  # it records the run (and says at the sweep's end if it could not)
            import uuid

            if helper.failed():
                return None
            run_id = uuid.uuid4().hex
            params = {k: v[:6000] for k, v in config.flatten(cfg, resolve=False).items()}
            helper.hand("failed", run_id, cfg.tracking.experiment, run_name(cfg), tags, int(time.time() * 1000), params)
            return run_id
        from mlflow.entities import Param

        client, experiment_id = store.open_store(cfg)
        run = client.create_run(experiment_id, run_name=run_name(cfg), tags=tags)
        try:
            params = config.flatten(cfg, resolve=False)
            client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
        finally:
            client.set_terminated(run.info.run_id, "FAILED")
        return run.info.run_id
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
        try:
            run.flush()
            if isinstance(e, TrainingDiverged):
                run.set_tags({"catnet.diverged_epoch": str(e.epoch)})
        except Exception as lost:  # noqa: BLE001 - the store is down: the status is what matters now
            log.error("tracking: run %s: its last points could not be written (%s)", run.run_id, store.brief(lost))
        _end_after(run, e, status, f"{type(e).__name__}: {told(e)}")
        raise
    if finish:
        run.end("FINISHED")
    else:
        run.set_tags({store.HANDOFF_TAG: "evaluate"})
        shutil.rmtree(run.private, ignore_errors=True)
