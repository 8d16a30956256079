"""``hydra/sweeper=catnet_optuna`` (``hparams_search=optuna``): an Optuna search with a study that
persists, pruning, and a new trial as soon as a worker is free.

- **The study** lives in ``storage`` (pipeline/search.py: a journal file of the project by default,
  or a database URL). Running the same command again continues it: ``n_trials`` counts the
  trials of the study that ended (complete, pruned, failed), so only the rest run; the sampler's
  seed is then ``seed`` plus the study's number of trials, so that it does not draw the first
  trials' values again. A trial left RUNNING by a search that was stopped (Ctrl-C, SIGTERM,
  ``kill -9``) is marked FAIL (attribute ``catnet.interrupted``), not counted, and its parameters
  are proposed again first.
- **Trials** are asked for one at a time and each launched alone, by the configured launcher, from
  one of ``n_jobs`` threads: when a trial ends, the next starts, whatever the others do (Hydra's
  own Optuna sweeper waits for a whole batch). With Hydra's basic launcher, which runs a job in
  this process, one at a time. Each job learns its trial from ``hydra.sweeper.trial``, reports
  intermediate values to the study and stops when the pruner says so (pipeline/search.py).
- **How a trial ended** comes back as the job's return value: a number (COMPLETE), or
  ``search.ended(...)`` (PRUNED, or FAIL with the reason). A job that diverged is FAIL in the study
  and counted apart by the sweep (pipeline/sweep.py).

``params`` take the syntax of Hydra's Optuna sweeper: ``choice(a, b)``, ``interval(lo, hi)``,
``tag(log, interval(lo, hi))``, ``range(lo, hi, step)``; values given on the command line as a
sweep (``train.lr=tag(log,interval(1e-5,1e-2))``) join them, plain values are fixed.
"""

import logging
import os
import queue
import signal
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from catnet.errors import BadValue

log = logging.getLogger(__name__)
INTERRUPTED = "catnet.interrupted"  # a trial's attribute: marked FAIL because its search was stopped
REASON = "catnet.reason"  # a FAIL trial's attribute: why


@dataclass
class OptunaSearchConf:
    _target_: str = "hydra_plugins.catnet_sweeper.optuna_search.OptunaSearch"
    direction: str = "maximize"
    study_name: str = "catnet"
    storage: Optional[str] = "optuna/journal.log"  # relative to the project; or a database URL
    n_trials: int = 20  # the study's total: a rerun runs what is missing
    n_jobs: int = 2  # trials at a time (each on a worker of the launcher)
    sampler: str = "tpe"  # tpe | random
    seed: Optional[int] = None  # the sampler's
    pruner: str = "median"  # median | hyperband | none
    n_startup_trials: int = 3  # median: trials that run whole before any is pruned
    n_warmup_steps: int = 2  # median: no pruning before this step (a network of the CV; an epoch with a validation split)
    report_every: int = 50  # epochs between reports of a validation metric
    trial: Optional[int] = None  # set for each job: its trial's id in the storage
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="catnet_optuna", node=OptunaSearchConf, provider="catnet")


def distribution(override: Any) -> Any:
    """The Optuna distribution of a sweep override (the syntax of Hydra's Optuna sweeper)."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop), step=int(value.step))
    if override.is_interval_sweep():
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(value.start, value.end, log=log_scale)
    raise BadValue(override.get_key_element(), override.get_value_element_as_str(),
                   "not a search space Optuna takes: choice(...), range(...), interval(...), tag(log, interval(...))")


def live_here(trial: Any) -> bool:
    """Whether the process that runs ``trial`` is alive on this host (False if it ran here and is
    gone; True if it runs on another host, which this process cannot tell)."""
    attrs = trial.user_attrs
    if "catnet.host" not in attrs:  # never launched: its search stopped while asking for it
        return False
    if attrs.get("catnet.host") != socket.gethostname():
        return True
    try:
        os.kill(int(attrs.get("catnet.pid", 0)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return int(attrs.get("catnet.pid", 0)) > 0


@contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the block is done, then act as they would have. (Python runs
    a signal's handler in the main thread whichever thread the signal reached: the handlers are
    swapped, not the signal mask.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: List[int] = []
    previous = {s: signal.signal(s, lambda number, frame: caught.append(number)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for number in caught[:1]:
            handler = previous[number]
            if callable(handler):
                handler(number, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), number)


class OptunaSearch(Sweeper):
    def __init__(self, **conf: Any) -> None:
        self.conf = conf
        self.launcher: Any = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function)

    def study(self) -> Any:
        """The study, created or continued; trials left RUNNING by a stopped search marked FAIL
        and queued again."""
        import optuna

        from pipeline import search
        from pipeline.common import ROOT

        study = optuna.create_study(
            study_name=self.conf["study_name"], storage=search.storage_of(self.conf["storage"], ROOT),
            sampler=search.sampler_of(self.conf), pruner=search.pruner_of(self.conf),
            direction=self.conf["direction"], load_if_exists=True)
        if study.direction != optuna.study.StudyDirection[self.conf["direction"].upper()]:
            raise BadValue("hydra.sweeper.direction", self.conf["direction"],
                           f"study {study.study_name!r} in {search.shown(self.conf['storage'])} "
                           f"{study.direction.name.lower()}s: name another hydra.sweeper.study_name")
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if live_here(trial):
                log.warning("Optuna: trial %d is RUNNING in another process; left alone", trial.number)
                continue
            study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        trials = study.get_trials(deepcopy=False)
        if trials and self.conf.get("seed") is not None:  # a continued study draws anew: the seed alone
            # would propose the study's first trials again (TPE's first trials are random draws)
            study.sampler = search.sampler_of({**self.conf, "seed": int(self.conf["seed"]) + len(trials)})
        retried = {t.user_attrs.get("catnet.retry_of") for t in trials}
        for trial in trials:
            if trial.user_attrs.get(INTERRUPTED) and trial.number not in retried:
                study.enqueue_trial(trial.params, user_attrs={"catnet.retry_of": trial.number}, skip_if_exists=False)
                log.info("Optuna: trial %d was running when its search stopped: marked FAIL, its parameters "
                         "queued again", trial.number)
        return study

    def space(self, arguments: List[str]) -> tuple:
        """(fixed overrides, {key: distribution}) from ``params`` and the command line."""
        parser = OverridesParser.create()
        params = dict(self.conf.get("params") or {})
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
        overrides += parser.parse_overrides(arguments)
        fixed, searched = [], {}
        for o in overrides:
            key = o.get_key_element()
            if o.is_sweep_override():
                searched[key] = distribution(o)
            else:
                searched.pop(key, None)
                fixed = [f for f in fixed if f.split("=", 1)[0] != key]
                fixed.append(o.input_line if o.input_line else f"{key}={o.get_value_element_as_str()}")
        return fixed, searched

    def sweep(self, arguments: List[str]) -> None:
        import optuna

        from pipeline import search

        study = self.study()
        fixed, searched = self.space(arguments)
        ended = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()
                 and not t.user_attrs.get(INTERRUPTED)]
        todo = max(0, int(self.conf["n_trials"]) - len(ended))
        basic = type(self.launcher).__name__ == "BasicLauncher"  # runs a job in this process: one at a time
        workers = 1 if basic else max(1, int(self.conf["n_jobs"]))
        log.info("Optuna: study %r in %s: %d trials ended, %d to run (n_trials=%d), %d at a time, pruner %s",
                 study.study_name, search.shown(self.conf["storage"]), len(ended), todo, self.conf["n_trials"], workers,
                 self.conf["pruner"])
        # Hydra's joblib launcher logs 3 lines for each batch, here a trial: this sweeper's 1 says it
        logging.getLogger("hydra_plugins.hydra_joblib_launcher._core").setLevel(logging.WARNING)
        results: "queue.Queue[tuple]" = queue.Queue()
        running: Dict[int, Any] = {}  # trial number -> trial
        asked = 0
        try:
            while asked < todo or running:
                while asked < todo and len(running) < workers:
                    with _signals_held():  # a trial exists in the study only once this search knows it
                        trial = study.ask(searched)
                        trial.set_user_attr("catnet.host", socket.gethostname())
                        trial.set_user_attr("catnet.pid", os.getpid())
                        running[trial.number] = trial
                    asked += 1
                    chosen = [f"{k}={v}" for k, v in trial.params.items()]
                    log.info("Optuna: trial %d: %s", trial.number, " ".join(chosen))
                    job = [*fixed, *chosen, f"hydra.sweeper.trial={trial._trial_id}"]
                    if basic:  # the job's number (#N in its run's name) is its trial's
                        results.put((trial.number, *self._launch(job, trial.number)))
                    else:
                        threading.Thread(target=lambda n=trial.number, j=job: results.put((n, *self._launch(j, n))),
                                         name=f"catnet-trial-{trial.number}", daemon=True).start()
                number, returned, error = results.get()
                with _signals_held():  # told, or still running: never neither
                    self._tell(study, running.pop(number), returned, error)
        except BaseException:
            while not results.empty():  # trials that ended before the stop are results
                number, returned, error = results.get()
                self._tell(study, running.pop(number), returned, error)
            # what was running is not a result: its job stops at its next report (pipeline/search.py:
            # SearchStopped), its run KILLED; joblib's workers are not killed mid-write of the journal
            for trial in running.values():
                try:
                    study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
                except Exception as e:  # noqa: BLE001 - the next run of the command marks it
                    log.error("Optuna: trial %d could not be marked failed: %s", trial.number, e)
            raise

    def _launch(self, job: List[str], idx: int) -> tuple:
        from pipeline import sweep
        from pipeline.common import Terminated

        try:
            (ret,) = self.launcher.launch([job], initial_job_idx=idx)
        except Terminated as e:  # SIGTERM (Ctrl-C is no Exception): the search stops, from its main thread;
            if threading.current_thread() is threading.main_thread():  # a trial's thread hands it over
                raise
            return None, e
        except Exception as e:  # noqa: BLE001 - told to the study as FAIL; the sweep goes on
            return None, e
        sweep.returned(ret)
        try:
            return ret.return_value, None
        except Exception as e:  # noqa: BLE001 - the job raised: told to the study as FAIL
            return None, e

    def _tell(self, study: Any, trial: Any, returned: Any, error: Optional[BaseException]) -> None:
        import math

        from optuna.trial import TrialState

        if error is None and isinstance(returned, (int, float)) and math.isfinite(returned):
            study.tell(trial, float(returned))
            log.info("Optuna: trial %d ended: %.4g", trial.number, returned)
            return
        if error is None and isinstance(returned, dict) and returned.get("state") == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
            log.info("Optuna: trial %d pruned at step %s (%.4g)", trial.number, returned.get("step"),
                     returned.get("value") or float("nan"))
            return
        reason = (f"{type(error).__name__}: {error}" if error is not None
                  else returned.get("reason") if isinstance(returned, dict) else f"it returned {returned!r}")
        trial.set_user_attr(REASON, str(reason)[:500])
        if isinstance(returned, dict) and returned.get("diverged"):
            trial.set_user_attr("catnet.diverged", True)
        study.tell(trial, state=TrialState.FAIL)
        log.info("Optuna: trial %d failed: %s", trial.number, reason)
