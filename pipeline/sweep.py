"""Hydra multirun into MLflow: one parent run per sweep, one child run per job.

``MlflowSweep`` is a Hydra callback (conf/config.yaml, ``hydra.callbacks``); it runs in the
process that launches the sweep. Before any job starts it creates the SQLite store, the
experiment and the parent run, so parallel jobs never race to create them, and hands the
parent's id to the jobs through the environment (inherited by joblib and local Ray workers).
When the sweep ends it records on the parent the number of jobs and the best child by the
sweep objective (a validation metric, never a test one).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

PARENT_ENV = "CATNET_MLFLOW_PARENT_RUN_ID"
SWEPT_ENV = "CATNET_SWEPT_KEYS"  # the keys the sweep varies: children are named by their values
log = logging.getLogger("catnet")


def objective_value(cfg: DictConfig, metrics: dict[str, float]) -> float:
    """The number a sweeper optimizes: ``sweep.objective``, or ``sweep.fallback`` when the run
    has no such metric (no validation split). NaN when neither is there (a failed job)."""
    for key in (cfg.sweep.objective, cfg.sweep.fallback):
        if key in metrics:
            return float(metrics[key])
    return math.nan


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.parent = None  # (client, run_id)
        self.sweep_cfg = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.tracking.enabled:
            return
        from mlflow.entities import Param

        from pipeline import tracking

        client, experiment_id = tracking.client_and_experiment(config)
        hc = config.hydra
        overrides = list(hc.overrides.task)
        name = f"sweep {' '.join(o for o in overrides if not o.startswith(('tracking.', 'hydra')))}"
        run = client.create_run(experiment_id, run_name=name[:250], tags={
            "catnet.sweep": "parent", "mlflow.source.name": "pipeline -m",
            **tracking.provenance_tags(),
        })
        self.parent = (client, run.info.run_id)
        self.sweep_cfg = config.sweep
        client.log_batch(run.info.run_id, params=[
            Param("sweep.overrides", " ".join(overrides)[:6000]),
            Param("sweep.sweeper", hc.sweeper._target_.rsplit(".", 1)[-1]),
            Param("sweep.launcher", hc.launcher._target_.rsplit(".", 1)[-1]),
            Param("sweep.objective", f"{config.sweep.objective} ({config.sweep.direction})"),
            Param("sweep.dir", str(hc.sweep.dir)),
        ])
        os.environ[PARENT_ENV] = run.info.run_id
        os.environ[SWEPT_ENV] = ",".join(swept_keys(config))
        atexit.register(self._abandoned)  # the sweep aborted: on_multirun_end never came
        log.info("sweep: MLflow parent run %s", run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent is None:
            return
        client, parent_id = self.parent
        self.parent = None
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(SWEPT_ENV, None)
        summary = summarize_children(client, parent_id, config.sweep)
        log.info("sweep: %d jobs, %d finished; best %s", summary["jobs"], summary["finished"],
                 summary.get("best_run_name", "none"))
        client.set_terminated(parent_id, "FINISHED")

    def _abandoned(self) -> None:
        if self.parent is not None:
            client, parent_id = self.parent
            summarize_children(client, parent_id, self.sweep_cfg)
            client.set_terminated(parent_id, "FAILED")


def swept_keys(config: DictConfig) -> list[str]:
    """Keys given several values on the command line, or searched by the sweeper."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    params = config.hydra.sweeper.get("params") or {}
    return keys + [k for k in params if k not in keys]


def summarize_children(client, parent_id: str, sweep: DictConfig) -> dict:
    """Count the children of ``parent_id``, pick the best finished one, record both on the parent."""
    from mlflow.entities import Metric, RunTag

    experiment_id = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                                  max_results=10000)
    finished = [r for r in children if r.info.status == "FINISHED"]
    summary: dict[str, Any] = {"jobs": len(children), "finished": len(finished)}
    metrics = [Metric("sweep/jobs", len(children), 0, 0), Metric("sweep/finished", len(finished), 0, 0)]
    tags = []
    for key in (sweep.objective, sweep.fallback):
        ranked = [r for r in finished if key in r.data.metrics]
        if ranked:
            sign = 1 if sweep.direction == "maximize" else -1
            tiebreak = f"{key.split('/')[0]}/final_error"  # equal accuracy: the lower error wins
            best = max(ranked, key=lambda r: (sign * r.data.metrics[key], -r.data.metrics.get(tiebreak, 0.0)))
            summary.update(best_run_id=best.info.run_id, best_run_name=best.info.run_name, objective=key)
            tags += [RunTag("catnet.best_run_id", best.info.run_id),
                     RunTag("catnet.best_run_name", best.info.run_name or ""),
                     RunTag("catnet.best_by", key)]
            metrics += [Metric(f"best/{k}", v, 0, 0) for k, v in best.data.metrics.items()
                        if k.split("/")[-1] in ("accuracy", "final_error", "error") and not k.startswith("best/")]
            break
    client.log_batch(parent_id, metrics=metrics, tags=tags)
    return summary
