"""A sweep's ledger: a folder private to the sweep (``LEDGER_ENV`` names it to its jobs) where each
job enters its outcome, so the sweep knows how many jobs finished and failed even with tracking
off or the store down (pipeline/sweep.py reads it at its end); and whether a job gave up waiting
for the tracking server.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline import common

LEDGER_ENV = "CATNET_SWEEP_LEDGER"  # the folder where each job writes its outcome


def job_started() -> Path | None:
    """Enter this job in the sweep's ledger (as RUNNING until ``job_ended``)."""
    ledger = os.environ.get(LEDGER_ENV)
    if not ledger or not Path(ledger).is_dir():
        return None
    entry = Path(ledger) / f"{uuid.uuid4().hex}.json"
    entry.write_text(json.dumps({"status": "RUNNING", "pid": os.getpid()}))
    return entry


def job_ended(entry: Path | None, status: str, reason: str | None = None, reused: str | None = None,
              unfinished: str | None = None, unrecorded: dict | None = None, run: str | None = None,
              diverged: bool = False, pruned: int | None = None) -> None:
    """``diverged``: FAILED because its training diverged or collapsed (a result: counted apart);
    ``pruned``: KILLED by an Optuna search's pruner at this step (a result: counted apart);
    ``reused``: the id of the FINISHED run the job stood for instead of training;
    ``unfinished``: the id of its run, left RUNNING because the store did not take its status;
    ``unrecorded``: its name and params, when the store was down and it has no run at all;
    ``run``: the id of its own run (whose status in the store has the last word: parent.reconcile)."""
    if entry is not None and entry.parent.is_dir():
        outcome = {"status": status, "reason": reason, "reused": reused, "unfinished": unfinished,
                   "unrecorded": unrecorded, "run": run, "diverged": diverged,
                   "pruned": pruned}
        common.atomic_write(entry, lambda f: json.dump(outcome, f), mode="w")


class WithOutcome:
    """A sweep's task function that returns, with its value, the outcome its job entered in a
    ledger of its own: for launchers whose jobs run where the sweep's ledger folder is not
    (another node of a Ray cluster). The launcher enters the outcome in the sweep's ledger
    (``enter``) and hands the value to the sweeper."""

    def __init__(self, task_function):
        self.task_function = task_function

    def __call__(self, cfg: DictConfig) -> tuple[Any, list[dict]]:
        folder = Path(tempfile.mkdtemp(prefix="catnet-job-"))
        previous = os.environ.get(LEDGER_ENV)
        os.environ[LEDGER_ENV] = str(folder)
        try:
            value = self.task_function(cfg)
            return value, read(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            if previous is None:
                os.environ.pop(LEDGER_ENV, None)
            else:
                os.environ[LEDGER_ENV] = previous


def enter(outcomes: list[dict]) -> None:
    """Enter, on the sweep's side, outcomes of jobs that ran elsewhere (``WithOutcome``)."""
    ledger = os.environ.get(LEDGER_ENV)
    for outcome in outcomes:
        if ledger and Path(ledger).is_dir():
            entry = Path(ledger) / f"{uuid.uuid4().hex}.json"
            common.atomic_write(entry, lambda f, o=outcome: json.dump(o, f), mode="w")


def returned(job):
    """A launcher's side of a ``WithOutcome`` job: its Hydra JobReturn with the job's own value,
    its outcome entered in the sweep's ledger."""
    from hydra.core.utils import JobStatus

    if job.status == JobStatus.COMPLETED:
        value, outcomes = job.return_value
        enter(outcomes)
        job.return_value = value
    else:
        enter([{"status": "FAILED", "reason": repr(job._return_value)[:300]}])
    return job


def lost(overrides, reason: str):
    """A job its launcher lost (a Ray task, a SLURM job ended without a result): FAILED with
    ``reason`` in the ledger, and its return to the sweeper (pipeline.search.ended), so the sweep goes on."""
    from hydra.core.utils import JobReturn, JobStatus

    from pipeline import search

    common.log.error("catnet: error: job %s: %s", " ".join(overrides), reason)
    enter([{"status": "FAILED", "reason": reason}])
    job = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    job.return_value = search.ended("failed", reason=reason)
    return job


def read(folder: Path) -> list[dict]:
    outcomes = []
    for entry in sorted(folder.glob("*.json")):
        try:
            outcomes.append(json.loads(entry.read_text()))
        except (OSError, ValueError):
            outcomes.append({"status": "RUNNING"})
    return outcomes


UNREACHABLE = "server-unreachable"  # in the ledger: a job gave up waiting for the tracking server


def wait_for_store(cfg: DictConfig) -> None:
    """A job whose tracking server does not answer waits for it up to ``tracking.retry_seconds``
    (it answered when the sweep started: a restart, a short outage); once a job gave up, the
    next ones ask only once, so a server gone for good fails the rest of the sweep quickly."""
    from pipeline.tracking import store

    uri = store.store_uri(cfg)[0] if cfg.tracking.enabled else ""
    if not uri.startswith(("http://", "https://")):
        return
    ledger = os.environ.get(LEDGER_ENV)
    marker = Path(ledger) / UNREACHABLE if ledger and Path(ledger).is_dir() else None
    wait = 0.0 if marker is not None and marker.exists() else float(cfg.tracking.retry_seconds or 0)
    try:
        store.check_server(uri, wait)
    except store.ServerUnreachable:
        if marker is not None:
            marker.touch()
        raise
    if marker is not None:
        marker.unlink(missing_ok=True)
