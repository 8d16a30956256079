"""``python -m pipeline``: load, normalize, train and evaluate in one process, one MLflow run.

The same stage functions as ``python -m pipeline.<stage>``; here they hand their results to
each other in memory instead of reading the previous stage's files. In a Hydra multirun each
job is one MLflow run, a child of the sweep's parent run (pipeline/sweep.py), and the job
returns the sweep objective to the sweeper.
"""

from __future__ import annotations

import sys

import logging  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from catnet.errors import CatnetError, TrainingDiverged, TrialPruned  # noqa: E402
from pipeline import curve, evaluate, load, normalize, search, tracking, train  # noqa: E402
from pipeline.common import CONF_DIR, ROOT, blas_settled, is_multirun, run_cli, run_main, told  # noqa: E402
from pipeline.config import prepare  # noqa: E402
from pipeline.tracking.query import metric_order, objective_value  # noqa: E402

log = logging.getLogger("catnet")
REUSED = "catnet.reused_from"  # in run_all's result: the run a reused job stands for
RUN = "catnet.run_id"  # in run_all's result: the job's own run


def run_all(cfg: DictConfig) -> dict:
    """Run every stage; return the evaluate stage's metrics as MLflow names them. The MLflow run
    opens once the data passed its checks (bad input fails in a second, before MLflow starts).

    In a sweep with ``sweep.reuse``, a job whose identity (pipeline/tracking/reuse.py) matches a
    FINISHED run trains nothing: it links that run under the sweep's parent and returns its
    metrics, with the key ``REUSED`` naming it; otherwise the key ``RUN`` names the job's run."""
    splits = load.run(cfg)
    digest = load.digest(splits)
    trial = search.trial_of(cfg, ROOT) if is_multirun() else None  # an Optuna search's
    key = tracking.reuse.identity(cfg, digest) if cfg.tracking.enabled else None
    if key and cfg.sweep.reuse and is_multirun():
        earlier = tracking.reuse.find(cfg, key)
        if earlier is not None:
            link = tracking.reuse.link(cfg, earlier, trial.tags() if trial else None)
            log.info("reused %s (%s): same config, commit and data; linked as run %s", earlier.run_id,
                     earlier.run_name, link)
            return {**earlier.metrics, REUSED: earlier.run_id, RUN: link}
    normalizer = normalize.kept(normalize.run(cfg, splits.train), splits)  # a sweep's inputs: made once
    # a single run's learning curve is drawn by a helper process started first thing
    # (pipeline/curve.py); a sweep's jobs draw none
    with (curve.helper(not is_multirun()) as drawer,
          tracking.open_run(cfg, tags={**tracking.reuse.run_tags(digest, key), **(trial.tags() if trial else {})})
          as mlrun):
        mlrun.record_data(digest, load.sources(cfg))
        net, cv = train.run(cfg, splits, normalizer, mlrun, drawer, trial)
        return {**cv, **evaluate.mlflow_metrics(evaluate.run(cfg, splits, normalizer, net, mlrun)), RUN: mlrun.run_id}


def objective(cfg: DictConfig, metrics: dict) -> float:
    """What the job returns to the sweeper: the first metric of the ranking order it has."""
    return objective_value(metrics, metric_order(cfg.sweep.objective, cfg.sweep.fallback))[1]


def _job(raw: DictConfig) -> float | dict:
    """One job of a sweep: a bad value or file, or a diverging run, fails this job (its run
    FAILED with the reason, one line in the log) and the sweep goes on; any other error too, with
    its traceback. The sweeper gets the objective, or how the job ended instead
    (pipeline/search.py: ``ended``). The sweep's summary, read from the runs, counts a job whose
    training diverged or collapsed apart (a result of its configuration: the sweep still exits
    0), and one an Optuna search pruned (its run KILLED, tagged with the step), any other
    failure as failed (exit 1)."""
    cfg = None  # until the values pass their checks
    blas_settled()
    try:
        cfg = prepare(raw, ROOT)
        tracking.store.wait_for_server(cfg, _sweep_dir())
        value = objective(cfg, run_all(cfg))
        return search.ended("failed", reason=f"{cfg.sweep.objective} is NaN") if math.isnan(value) else value
    except TrialPruned as e:
        log.info("%s", e)
        return search.ended("pruned", value=e.value, step=e.step)
    except Exception as e:  # noqa: BLE001 - a bug or an outage fails this job, not the whole sweep
        reason = f"{type(e).__name__}: {told(e)}"
        if isinstance(e, CatnetError):
            log.error("catnet: error: %s", told(e))
        elif raw.tracking.enabled and tracking.store.unreachable(e):  # an outage, not a bug: one line
            reason = f"the tracking server did not answer: {tracking.store.brief(e)}"
            log.error("catnet: error: %s", reason)
        else:
            log.exception("catnet: job failed")
        unrecorded = None
        if raw.tracking.enabled and not tracking.run.recorded(e):  # failed before its run existed
            if tracking.parent.failed_run(cfg or raw, e) is None:  # the store is down: the sweep records it later
                unrecorded = tracking.parent.job_record(cfg or raw)
        return search.ended("failed", reason=reason, diverged=isinstance(e, TrainingDiverged),
                            run=tracking.run.unfinished(e), job=unrecorded)


def _sweep_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(str(HydraConfig.get().sweep.dir))
    except ValueError:  # no Hydra config: a job called outside Hydra (a test)
        return None


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    if is_multirun():
        return _job(cfg)
    run_cli(run_all, cfg)
    return None


if __name__ == "__main__":
    curve.start_early(sys.argv[1:])  # a single run's curve helper imports what it needs while Hydra composes
    run_main(main)
