"""Job reuse: a sweep's job whose identity matches a FINISHED run is not trained again.

A run's identity is one hash (tag ``catnet.identity``) of what decides its result: the composed
config without the settings that only say where and how it is recorded (``tracking.*``,
``paths.*``, ``sweep.*``, ``train.progress``), the code (the git commit, and only when the tree
is clean: a dirty tree has no identity and is never reused), the data (the md5 of the
arrays the run learns from and is judged on), and the BLAS that computes it (library, version,
kernel and thread count: each rounds float sums its own way, pipeline/blas.py). The look-up is
one query on that tag.

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

from omegaconf import DictConfig

from pipeline import config
from pipeline import provenance
from pipeline.tracking import query, store
from pipeline.tracking.query import IDENTITY_TAG, REUSED_TAG, Earlier
NOT_IDENTITY = ("tracking.", "paths.", "sweep.")  # where and how a run is recorded, not what it is
NOT_IDENTITY_KEYS = {"train.progress"}

log = logging.getLogger("catnet")


@functools.lru_cache(maxsize=1)
def clean_commit() -> str | None:
    """The commit the code is at, if the tree is clean (the stages' own results aside)."""
    tags = provenance.provenance_tags()
    if tags.get("catnet.git.dirty") != "False":
        return None
    return tags.get("mlflow.source.git.commit")


def why_none() -> str | None:
    """Why runs have no identity here (so a sweep reuses nothing), or None when they have one."""
    if clean_commit() is not None:
        return None
    tags = provenance.provenance_tags()
    if "mlflow.source.git.commit" not in tags:
        return "the project is not a git checkout"
    changed = provenance.changed_files()
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"the code or config differs from commit {tags['mlflow.source.git.commit'][:8]} ({shown})"


def identity(cfg: DictConfig, data_digest: str) -> str | None:
    """The run's identity hash, or None when the code has none (a dirty tree, no git)."""
    commit = clean_commit()
    if commit is None:
        return None
    params = {k: v for k, v in config.flatten(cfg).items()
              if not k.startswith(NOT_IDENTITY) and k not in NOT_IDENTITY_KEYS}
    blob = json.dumps({"config": params, "commit": commit, "data": data_digest, "blas": provenance.blas()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:40]


def run_tags(data_digest: str, key: str | None) -> dict[str, str]:
    """The tags a run that trains is created with: the md5 of its data and, when it has one, its
    identity (what a later identical job finds it by)."""
    return {"catnet.data.md5": data_digest, **({IDENTITY_TAG: key} if key else {})}


def find(cfg: DictConfig, key: str) -> Earlier | None:
    """The earliest FINISHED run of the experiment that trained with this identity, or None."""
    client, experiment_id = store.open_store(cfg)
    return query.identical(client, experiment_id, key)


def link(cfg: DictConfig, original: Earlier, tags: dict[str, str] | None = None) -> str:
    """A FINISHED child of this sweep's parent standing for ``original`` (with ``tags`` of its
    own: an Optuna trial's); returns its id."""
    from mlflow.entities import Metric, Param

    from pipeline.tracking.run import status_after

    tags = {**(tags or {}), "mlflow.source.name": "pipeline", REUSED_TAG: original.run_id,
            IDENTITY_TAG: original.tags[IDENTITY_TAG], **provenance.process_tags()}
    for key in ("catnet.model_uri", "catnet.trained", "mlflow.source.git.commit", "catnet.data.md5", "catnet.seed"):
        if key in original.tags:
            tags[key] = original.tags[key]
    if parent := provenance.parent_run_id():
        tags["mlflow.parentRunId"] = parent
    client, experiment_id = store.open_store(cfg)
    run_id = client.create_run(experiment_id, run_name=provenance.run_name(cfg), tags=tags,
                               start_time=int(time.time() * 1000)).info.run_id
    try:
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in config.flatten(cfg).items()],
                         metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in original.metrics.items()])
    except BaseException as e:  # Ctrl-C / SIGTERM too: KILLED then
        client.set_terminated(run_id, status_after(e))
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def origin(run) -> str:
    """The id of the run that trained: the run itself, or the one a link stands for."""
    return run.data.tags.get(REUSED_TAG, run.info.run_id)
