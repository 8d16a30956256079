"""Job reuse: a sweep's job whose identity matches a FINISHED run is not trained again.

A run's identity is one hash (tag ``catnet.identity``) of what decides its result: the composed
config without the settings that only say where and how it is recorded (``tracking.*``,
``paths.*``, ``sweep.*``, ``train.progress``), the code (the git commit, and only when the tree
is clean: a dirty tree has no identity and is never reused), and the data (the md5 of the
arrays the run learns from and is judged on). The look-up is one query on that tag, after an
identical run of this process that the sweep's helper still writes has ended.

A matched job links the earlier run under its own sweep's parent: a child run holding the same
params, the earlier run's final metrics and model URI, and the tag ``catnet.reused_from``; it
trains nothing and logs no artifacts.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from typing import NamedTuple

from omegaconf import DictConfig

from pipeline import config
from pipeline.tracking import run as tracking_run
from pipeline.tracking import store, writer

IDENTITY_TAG = "catnet.identity"
REUSED_TAG = "catnet.reused_from"
NOT_IDENTITY = ("tracking.", "paths.", "sweep.")  # where and how a run is recorded, not what it is
NOT_IDENTITY_KEYS = {"train.progress"}

log = logging.getLogger("catnet")


@functools.lru_cache(maxsize=1)
def clean_commit() -> str | None:
    """The commit the code is at, if the tree is clean (the stages' own results aside)."""
    tags = tracking_run.provenance_tags()
    if tags.get("catnet.git.dirty") != "False":
        return None
    return tags.get("mlflow.source.git.commit")


def identity(cfg: DictConfig, data_digest: str) -> str | None:
    """The run's identity hash, or None when the code has none (a dirty tree, no git)."""
    commit = clean_commit()
    if commit is None:
        return None
    params = {k: v for k, v in config.flatten(cfg).items()
              if not k.startswith(NOT_IDENTITY) and k not in NOT_IDENTITY_KEYS}
    blob = json.dumps({"config": params, "commit": commit, "data": data_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def run_tags(data_digest: str, key: str | None) -> dict[str, str]:
    """The tags a run that trains is created with: the md5 of its data and, when it has one, its
    identity (what a later identical job finds it by)."""
    return {"catnet.data.md5": data_digest, **({IDENTITY_TAG: key} if key else {})}


class Earlier(NamedTuple):
    """A FINISHED run a job stands for: what the job needs of it."""

    run_id: str
    run_name: str
    metrics: dict[str, float]
    tags: dict[str, str]


def find(cfg: DictConfig, key: str) -> Earlier | None:
    """The earliest FINISHED run of the experiment that trained with this identity, or None.
    A sweep's helper that holds the record answers, once it wrote what was handed over before."""
    helper = writer.owner(store.store_uri(cfg)[0])
    if helper is not None:
        try:
            return helper.ask("find", cfg.tracking.experiment, key)
        except writer.WriterLost:
            writer.lost_owner()  # this process goes on with the record
    client, experiment_id = store.open_store(cfg)
    _await_own_records(client, experiment_id, key)
    return search(client, experiment_id, key)


def search(client, experiment_id: str, key: str) -> Earlier | None:
    runs = client.search_runs([experiment_id], f"tags.`{IDENTITY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
                              max_results=100, order_by=["attributes.start_time ASC"])
    trained = [r for r in runs if REUSED_TAG not in r.data.tags]
    if not trained:
        return None
    run = trained[0]
    return Earlier(run.info.run_id, run.info.run_name, dict(run.data.metrics), dict(run.data.tags))


def _await_own_records(client, experiment_id: str, key: str, seconds: float = writer.CLOSE_SECONDS) -> None:
    """An identical job earlier in this process (``seed=0,0``, a trial Optuna suggests again) may
    have ended while the sweep's helper still writes its record (pipeline/tracking/writer.py):
    its run stays RUNNING until the helper ends it. Wait for that, while the helper lives, so
    that this job reuses the run instead of training again."""
    if not writer.running():
        return
    own = " and ".join(f"tags.`{k}` = '{v}'" for k, v in store.process_tags().items())
    where = f"tags.`{IDENTITY_TAG}` = '{key}' and attributes.status = 'RUNNING' and {own}"
    deadline = time.monotonic() + seconds
    while (client.search_runs([experiment_id], where, max_results=1) and writer.running()
           and time.monotonic() < deadline):
        time.sleep(0.02)


def link(cfg: DictConfig, original: Earlier) -> str:
    """A FINISHED child of this sweep's parent standing for ``original``; returns its id."""
    tags = {"mlflow.source.name": "pipeline", REUSED_TAG: original.run_id,
            IDENTITY_TAG: original.tags[IDENTITY_TAG], **store.process_tags()}
    for key in ("catnet.model_uri", "catnet.trained", "mlflow.source.git.commit", "catnet.data.md5", "catnet.seed"):
        if key in original.tags:
            tags[key] = original.tags[key]
    if parent := tracking_run.parent_run_id():
        tags["mlflow.parentRunId"] = parent
    params = {k: v[:6000] for k, v in config.flatten(cfg).items()}
    name = tracking_run.run_name(cfg)
    helper = writer.owner(store.store_uri(cfg)[0])
    if helper is not None:  # it makes the run (the sweep's end checks that it did)
        import uuid

        run_id = uuid.uuid4().hex
        helper.hand("link", run_id, cfg.tracking.experiment, name, tags, int(time.time() * 1000), params,
                    original.metrics)
        return run_id
    client, experiment_id = store.open_store(cfg)
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    try:
        tracking_run.write_to(client, run.info.run_id, "params", params)
        tracking_run.write_to(client, run.info.run_id, "metrics", original.metrics, 0)
    except BaseException as e:  # Ctrl-C / SIGTERM too: KILLED then
        client.set_terminated(run.info.run_id, tracking_run.status_after(e))
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def origin(run) -> str:
    """The id of the run that trained: the run itself, or the one a link stands for."""
    return run.data.tags.get(REUSED_TAG, run.info.run_id)
