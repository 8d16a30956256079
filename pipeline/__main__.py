"""``python -m pipeline``: load, normalize, train and evaluate in one process, one MLflow run.

The same stage functions as ``python -m pipeline.<stage>``; here they hand their results to
each other in memory instead of reading the previous stage's files. In a Hydra multirun each
job is one MLflow run, a child of the sweep's parent run (pipeline/sweep.py), and the job
returns the sweep objective to the sweeper.
"""

from __future__ import annotations

import logging
import math
import os

import hydra
from omegaconf import DictConfig

from catnet.errors import CatnetError
from pipeline import evaluate, load, normalize, tracking, train
from pipeline.common import CONF_DIR, ROOT, is_multirun, run_cli
from pipeline.config import prepare
from pipeline.sweep import objective_value

log = logging.getLogger("catnet")


def run_all(cfg: DictConfig) -> dict:
    """Run every stage; return the evaluate stage's metrics as MLflow names them."""
    splits = load.run(cfg)
    normalizer = normalize.run(cfg, splits.train)
    with tracking.open_run(cfg) as mlrun:
        net, cv = train.run(cfg, splits, normalizer, mlrun)
        return {**cv, **evaluate.mlflow_metrics(evaluate.run(cfg, splits, normalizer, net, mlrun))}


def _blas_threads() -> int | None:
    """Cores per job when a launcher runs jobs side by side, so they do not oversubscribe."""
    from hydra.core.hydra_config import HydraConfig

    n_jobs = HydraConfig.get().launcher.get("n_jobs")
    if not n_jobs:
        return None
    cores = os.cpu_count() or 1
    return max(1, cores // (cores if n_jobs < 0 else min(n_jobs, cores)))


def _job(cfg: DictConfig) -> float:
    """One job of a sweep: a bad value or file, or a diverging run, fails this job (its run
    FAILED, one line in the log) and the sweep goes on; any other error too, with its traceback.
    The sweeper then gets the worst possible objective (-inf when maximizing): Optuna stops the
    whole study on a NaN."""
    from threadpoolctl import threadpool_limits

    worst = -math.inf if cfg.sweep.direction == "maximize" else math.inf
    with threadpool_limits(limits=_blas_threads()):
        try:
            cfg = prepare(cfg, ROOT)
            value = objective_value(cfg, run_all(cfg))
            return worst if math.isnan(value) else value
        except CatnetError as e:
            log.error("catnet: error: %s", e)
            return worst
        except Exception:  # noqa: BLE001 - a bug or an outage fails this job, not the whole sweep
            log.exception("catnet: job failed")
            return worst


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    if is_multirun():
        return _job(cfg)
    return objective_value(cfg, run_cli(run_all, cfg))


if __name__ == "__main__":
    main()
