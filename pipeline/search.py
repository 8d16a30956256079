"""The Optuna search's pieces that both sides use: the sweeper (hydra_plugins/catnet_sweeper/
optuna_search.py), which asks the study for trials and tells it how they ended, and each trial's
job, which reports intermediate values to the same study and stops when its pruner says so.

The study lives in ``hydra.sweeper.storage``: a file path (Optuna's journal file, relative to the
project; every process of one machine can share it) or a database URL (``sqlite:///...``,
``postgresql://...``: a team's, which every node of a cluster reaches). The sweeper hands
each job its trial through ``hydra.sweeper.trial`` (the trial's id in the storage), a Hydra
setting, so it is in neither the job's identity nor its name.

A job ends in one of three ways the sweeper tells Optuna (``ended``): with its objective (a
float: COMPLETE), pruned (``{"state": "pruned", ...}``: PRUNED) or failed (``{"state": "failed",
...}``: FAIL, with the reason, and whether the training diverged or collapsed).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

from catnet.errors import BadValue, TrialPruned, check_choice
from pipeline.common import Terminated

log = logging.getLogger("catnet")
PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")
STUDY_TAG, TRIAL_TAG = "optuna.study", "optuna.trial"  # on each trial's MLflow run


def storage_of(spec: str | None, root: Path):
    """The Optuna storage ``hydra.sweeper.storage`` names: a database URL, else a journal file
    (relative paths from the project's root; its folder made)."""
    if not spec:
        raise BadValue("hydra.sweeper.storage", spec, "name a file (Optuna's journal) or a database URL")
    spec = str(spec)
    if "://" in spec:
        import optuna

        return optuna.storages.RDBStorage(spec, engine_kwargs={"pool_pre_ping": True})
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(spec) if Path(spec).is_absolute() else root / spec
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def pruner_of(conf: Mapping[str, Any]):
    """``hydra.sweeper.pruner``: median (a trial whose running value is worse than the median of
    the earlier trials' at the same step stops, once ``n_startup_trials`` trials ran whole and
    from step ``n_warmup_steps`` on), hyperband (successive halving from step 1, a third kept at
    each rung), or none."""
    import optuna

    name = str(conf.get("pruner") or "none")
    check_choice("hydra.sweeper.pruner", name, PRUNERS)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=int(conf.get("n_startup_trials") or 0),
                                           n_warmup_steps=int(conf.get("n_warmup_steps") or 0))
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()


def sampler_of(conf: Mapping[str, Any]):
    import optuna

    name = str(conf.get("sampler") or "tpe")
    check_choice("hydra.sweeper.sampler", name, SAMPLERS)
    seed = conf.get("seed")
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials running side by side are not proposed the same point
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def shown(spec: str | None) -> str:
    """A storage as a record may show it: a database URL without its password."""
    if spec and "://" in str(spec):
        from sqlalchemy.engine import make_url

        return make_url(str(spec)).render_as_string(hide_password=True)
    return str(spec)


def check(conf: Mapping[str, Any]) -> None:
    """Refuse a search's settings that no trial could run with, before any runs."""
    pruner_of(conf)
    sampler_of(conf)
    if not conf.get("storage"):
        storage_of(None, Path("."))
    for key in ("n_trials", "n_jobs"):
        if int(conf.get(key) or 0) < 1:
            raise BadValue(f"hydra.sweeper.{key}", conf.get(key), "must be a whole number of 1 or more")


def ended(state: str, *, value: float | None = None, step: int | None = None, reason: str | None = None,
          diverged: bool = False, run: str | None = None, job: dict | None = None) -> dict:
    """What a job that did not complete returns to the sweeper (module doc); ``run``: its MLflow
    run, if it has one; ``job``: its run's name and params, for the sweep to record it if it has
    none (the store was down: pipeline/tracking/parent.py)."""
    return {"state": state, "value": value, "step": step, "reason": reason, "diverged": diverged, "run": run,
            "job": job}


def lost(overrides, reason: str):
    """A job its launcher lost (a Ray task, a SLURM job ended without a result): its return to the
    sweeper, failed with ``reason``, so the sweep goes on (its run, if it made one and could not
    end it, is closed FAILED at the sweep's end)."""
    from hydra.core.utils import JobReturn, JobStatus

    log.error("catnet: error: job %s: %s", " ".join(overrides), reason)
    job = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    job.return_value = ended("failed", reason=reason)
    return job


class SearchStopped(Terminated):
    """This job's trial was ended by its search, which was stopped: the job stops as on SIGTERM
    (its run KILLED)."""


class Trial:
    """This job's trial of the search: reports intermediate values of the objective to the study
    and raises ``TrialPruned`` when the study's pruner stops it."""

    def __init__(self, conf: Mapping[str, Any], root: Path, objective: str, every: int):
        import optuna

        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        storage = storage_of(conf.get("storage"), root)
        study = optuna.load_study(study_name=str(conf["study_name"]), storage=storage, pruner=pruner_of(conf))
        self.study_name = study.study_name
        self.number = storage.get_trial_number_from_id(int(conf["trial"]))
        self.trial = optuna.trial.Trial(study, int(conf["trial"]))
        self.objective = objective  # the metric reported and pruned on
        self.every = max(1, int(every))  # epochs between reports of a validation metric

    def tags(self) -> dict[str, str]:
        return {STUDY_TAG: self.study_name, TRIAL_TAG: str(self.number)}

    def report(self, value: float, step: int) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        if math.isnan(value):
            return
        try:
            self.trial.report(float(value), step)
        except UpdateFinishedTrialError:  # its search was stopped, and the trial marked FAIL since
            raise SearchStopped(f"trial {self.number} of study {self.study_name!r} was ended by its search "
                                "(stopped while this job ran)") from None
        if self.trial.should_prune():
            raise TrialPruned(step, float(value))

    def on_fold(self, k: int, means: dict[str, float]) -> None:
        """Cross-validation: the running mean of the objective after each network."""
        if self.objective in means:
            self.report(means[self.objective], k)

    def on_epoch(self, epoch: int, errors: dict[str, float]) -> None:
        """A validation split: the validation error every ``every`` epochs (if that is the objective)."""
        if self.objective == "val/error" and epoch % self.every == 0 and "val_error" in errors:
            self.report(errors["val_error"], epoch)


def trial_of(cfg, root: Path) -> Trial | None:
    """This job's trial, if an Optuna search launched it (``hydra.sweeper.trial``), else None."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    conf = HydraConfig.get().sweeper
    if conf.get("trial") is None:
        return None
    return Trial(conf, root, str(cfg.sweep.objective), int(conf.get("report_every") or 50))
