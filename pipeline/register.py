"""``python -m pipeline.register``: put the best run's model in the MLflow Model Registry.

    python -m pipeline.register                                  # best run of experiment catnet
    python -m pipeline.register experiment=catnet parent=<sweep parent run id> name=catnet alias=champion

Picks, among the FINISHED runs that logged a model, the best by ``metric`` (validation balanced
accuracy by default; ``fallback`` when no run has it), registers its model under ``name`` and
points ``alias`` at the new version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from catnet.errors import ConfigError
from pipeline.common import CONF_DIR, log, run_cli
from pipeline.config import TrackingConfig


@dataclass
class RegisterConfig:
    experiment: str = "catnet"
    parent: Optional[str] = None  # only the children of this sweep parent run
    metric: str = "val/balanced_accuracy"
    fallback: str = "test/accuracy"  # runs without a validation split
    direction: str = "maximize"
    name: str = "catnet"  # registered model name
    alias: str = "champion"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


ConfigStore.instance().store(name="register_schema", node=RegisterConfig)


def register(cfg: DictConfig) -> dict:
    import mlflow

    from pipeline import tracking

    uri, _ = tracking.store_uri(cfg)
    mlflow.set_tracking_uri(uri)  # the registry resolves the model through the tracking store
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        raise ConfigError(f"experiment={cfg.experiment!r}: no such MLflow experiment in {uri}")
    filters = ["attributes.status = 'FINISHED'", "tags.`catnet.model_uri` != ''"]
    if cfg.parent:
        filters.append(f"tags.mlflow.parentRunId = '{cfg.parent}'")
    runs = client.search_runs([exp.experiment_id], " and ".join(filters), max_results=50000)
    for metric in (cfg.metric, cfg.fallback):
        ranked = [r for r in runs if metric in r.data.metrics]
        if ranked:
            break
    else:
        raise ConfigError(f"no finished run with a model and metric {cfg.metric} or {cfg.fallback} "
                          f"in experiment {cfg.experiment!r}")
    sign = 1 if cfg.direction == "maximize" else -1
    best = max(ranked, key=lambda r: sign * r.data.metrics[metric])
    model_uri = best.data.tags["catnet.model_uri"]
    try:
        client.get_registered_model(cfg.name)
    except Exception:  # noqa: BLE001 - MLflow raises RESOURCE_DOES_NOT_EXIST
        client.create_registered_model(cfg.name, description="catnet: cat / non-cat classifier")
    same = [v for v in client.search_model_versions(f"name='{cfg.name}'") if v.source == model_uri]
    version = same[0] if same else client.create_model_version(
        cfg.name, model_uri, run_id=best.info.run_id,
        tags={"selected_by": f"{metric}={best.data.metrics[metric]:.4g}"})
    client.set_registered_model_alias(cfg.name, cfg.alias, version.version)
    log.info("register: run %s (%s %s=%.4g) -> models:/%s/%s, alias @%s", best.info.run_id,
             best.info.run_name, metric, best.data.metrics[metric], cfg.name, version.version, cfg.alias)
    print(f"models:/{cfg.name}@{cfg.alias} = version {version.version} = run {best.info.run_id}")
    return {"run_id": best.info.run_id, "version": version.version, "metric": metric}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="register")
def main(cfg: DictConfig) -> None:
    run_cli(register, cfg, validate=False)


if __name__ == "__main__":
    main()
