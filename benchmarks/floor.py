"""The frameworks' floor: what Hydra and MLflow cost a run that does nothing of its own.

    python -m benchmarks.floor [hydra overrides]      # e.g. -m 'seed=range(0,16)' tracking.enabled=false

A Hydra app over the project's own ``conf/`` (the same files, defaults and sweeper), whose task
imports numpy, as every run needs it, and trains nothing. With ``tracking.enabled=true`` it makes
the least record an MLflow run can be: the run created with a tag, the composed config's values
as params and 1000 points of one metric in one batch, its status set; a sweep's jobs share one
client. No sweep parent run, no data, no artifacts, no model. ``benchmarks/sweeps.py`` times it
beside ``python -m pipeline``: catnet's own cost is the difference.
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig

from pipeline.common import ROOT  # noqa: F401 - registers ${catnet.root:}, which conf/ names
from pipeline.config import flatten

_CLIENT: list = []  # (client, experiment id), made by a sweep's first job


def _record(cfg: DictConfig) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    if not _CLIENT:
        client = MlflowClient(tracking_uri=cfg.tracking.uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        _CLIENT.append((client, exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)))
    client, experiment_id = _CLIENT[0]
    run = client.create_run(experiment_id, tags={"mlflow.source.name": "floor"})
    flat = flatten(cfg, resolve=False)  # catnet's own params, as its runs log them
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in flat.items()],
                     metrics=[Metric("train/error", 1.0 / e, now, e) for e in range(1, 1001)])
    client.set_terminated(run.info.run_id, "FINISHED")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    import numpy  # noqa: F401 - every run of the pipeline imports it

    if cfg.tracking.enabled:
        _record(cfg)


if __name__ == "__main__":
    main()
