"""``python -m pipeline``: load, normalize, train and evaluate in one process, one MLflow run.

The same stage functions as ``python -m pipeline.<stage>``; here they hand their results to
each other in memory instead of reading the previous stage's files.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from pipeline import evaluate, load, normalize, tracking, train
from pipeline.common import CONF_DIR, run_cli


def run_all(cfg: DictConfig) -> dict:
    """Run every stage; return the evaluate stage's metrics."""
    train_set, test_set = load.run(cfg)
    normalizer = normalize.run(cfg, train_set)
    with tracking.open_run(cfg) as mlrun:
        net = train.run(cfg, train_set, normalizer, mlrun)
        return evaluate.run(cfg, train_set, test_set, normalizer, net, mlrun)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    metrics = run_cli(run_all, cfg)
    return metrics["test"]["accuracy"]


if __name__ == "__main__":
    main()
