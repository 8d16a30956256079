"""``python -m pipeline.register``: put the best run's model in the MLflow Model Registry.

    python -m pipeline.register                                  # best run of experiment catnet
    python -m pipeline.register experiment=catnet parent=<sweep parent run id> name=catnet alias=champion
    python -m pipeline.register run_id=<run id>                  # the run you chose, whatever its rank

Picks, among the FINISHED runs that trained, the best by the one ranking rule
(pipeline/tracking/query.py: ``metric``, validation balanced accuracy by default, then the
cross-validated one, then ``fallback``, the training set's; never a test metric), registers its
model under ``name``
and points ``alias`` at that version. With ``run_id``, that run is registered instead (a FINISHED
run that trained, or a sweep's link to one: the run it reuses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from catnet.errors import ConfigError
from pipeline.common import CONF_DIR, log, run_cli, run_main
from pipeline.config import TrackingConfig


@dataclass
class RegisterConfig:
    experiment: str = "catnet"
    parent: Optional[str] = None  # only the children of this sweep parent run
    run_id: Optional[str] = None  # this run, not the best one
    metric: str = "val/balanced_accuracy"  # then cv/balanced_accuracy, then ``fallback``
    fallback: str = "train/balanced_accuracy"  # never a test/ metric
    direction: str = "maximize"
    name: str = "catnet"  # registered model name
    alias: str = "champion"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


ConfigStore.instance().store(name="register_schema", node=RegisterConfig)


def register(cfg: DictConfig) -> dict:
    from pipeline.tracking import model, query, reuse, store

    order = query.metric_order(cfg.metric, cfg.fallback, knobs=("metric", "fallback"))  # refuses a test/ metric first
    if cfg.run_id:
        return _register_chosen(cfg, str(cfg.run_id))
    client, experiment_id = store.open_store(cfg, experiment=cfg.experiment, create=False)
    parent = query.run_of(client, cfg.parent, "parent").info.run_id if cfg.parent else None
    runs = query.finished_runs(client, experiment_id, parent, with_model=True)
    metric, ranked = query.rank(runs, lambda r: r.data.metrics, order, cfg.direction)
    if not ranked:
        raise ConfigError(f"no finished run with a model and a metric among {', '.join(order)} "
                          f"in experiment {cfg.experiment!r}" + (f" under parent {cfg.parent}" if cfg.parent else ""))
    best = ranked[0]
    value = best.data.metrics[metric]
    run_id = reuse.origin(best)  # a sweep's link to a reused run: the run that trained
    model_uri = model.ensure(client, best if run_id == best.info.run_id else client.get_run(run_id))
    version = model.register(client, model_uri, run_id, cfg.name, cfg.alias, tags={"selected_by": f"{metric}={value:.4g}"})
    log.info("register: run %s (%s %s=%.4g) -> models:/%s/%s, alias @%s", run_id,
             best.info.run_name, metric, value, cfg.name, version.version, cfg.alias)
    print(f"models:/{cfg.name}@{cfg.alias} = version {version.version} = run {run_id} "
          f"(selected by {metric}={value:.4g})")
    return {"run_id": run_id, "version": version.version, "metric": metric}


def _register_chosen(cfg: DictConfig, chosen: str) -> dict:
    """Register run ``chosen`` (a link: the run it reuses) under ``name`` and point ``alias`` at it."""
    from pipeline.tracking import model, query, reuse, store

    client = store.client(cfg)
    run = query.run_of(client, chosen)
    run_id = reuse.origin(run)
    if run_id != run.info.run_id:
        run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        raise ConfigError(f"run_id={chosen}: the run is {run.info.status}, not FINISHED: it has no model to register")
    model_uri = model.ensure(client, run)
    version = model.register(client, model_uri, run_id, cfg.name, cfg.alias, tags={"selected_by": "run_id"})
    print(f"models:/{cfg.name}@{cfg.alias} = version {version.version} = run {run_id} (chosen by run_id)")
    return {"run_id": run_id, "version": version.version, "metric": None}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="register")
def main(cfg: DictConfig) -> None:
    run_cli(register, cfg, validate=False)


if __name__ == "__main__":
    run_main(main)
