"""``hydra/launcher=slurm``: each job of a sweep a SLURM job, through submitit.

hydra-submitit-launcher's SlurmLauncher, with what a sweep needs from it:

- **Every job is counted.** The stock launcher collects ``[job.results()[0] for job in jobs]``: one
  job cancelled, timed out or killed on its node raises, and the sweep loses the other jobs'
  results. Here such a job is a FAILED job with its SLURM state as the reason (its return:
  pipeline.search.ended), and the sweep goes on and exits non-zero.
- **One sweep folder**: each job gets the folder the driver resolved (``${now:...}`` resolved
  on a node, later, would name another).
- **scancel stops a job as SIGTERM stops a run**: submitit ignores SIGTERM in its jobs (SLURM sends
  it before a preemption); catnet's job raises on it instead, so its MLflow run ends KILLED before
  SLURM's SIGKILL (``KillWait`` seconds later).

Each job's run carries its SLURM job id (tag ``catnet.slurm.job_id``: pipeline/tracking/store.py).
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn

try:  # Hydra imports every module under hydra_plugins at start-up: without the cluster extra, no class
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _StockSlurmLauncher
except ImportError:
    _StockSlurmLauncher = None

log = logging.getLogger(__name__)


class _CatnetSlurm:
    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.sweep_dir: str | None = None

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state) -> JobReturn:
        """A job, on its node."""
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import run_job, setup_globals
        from omegaconf import open_dict

        from pipeline.common import raise_terminated

        signal.signal(signal.SIGTERM, raise_terminated)  # scancel, a time limit: the run ends KILLED
        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, sweep_overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = submitit.JobEnvironment().job_id
            sweep_config.hydra.job.num = job_num
            sweep_config.hydra.sweep.dir = self.sweep_dir  # as the driver resolved it
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=sweep_config,
                       job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit the jobs as one SLURM job array (as the stock launcher does), then collect each."""
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        params = dict(self.params)
        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout", 0))
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        self.sweep_dir = str(Path(str(self.config.hydra.sweep.dir)).absolute())
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
        log.info("SLURM: %d jobs, sweep output dir %s", len(job_overrides), self.sweep_dir)
        args = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*args))
        return [self._returned(job, overrides) for job, overrides in zip(jobs, job_overrides)]

    def _returned(self, job, overrides: Sequence[str]) -> JobReturn:
        """The job's return; a job SLURM ended without a result (cancelled, timed out, killed on its
        node) is a failed job, and the sweep goes on."""
        from pipeline import search

        try:
            return job.results()[0]
        except Exception as e:  # noqa: BLE001 - submitit's UncompletedJobError, FailedJobError
            state = job.watcher.get_state(job.job_id, mode="force")
            return search.lost(overrides, f"SLURM job {job.job_id} ended {state}: {_last_error(str(e))[:300]}")


def _last_error(text: str) -> str:
    """The exception a job's traceback ends with (``ModuleNotFoundError: ...``), else its first line."""
    import re

    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Terminated|Interrupt)\b", line)]
    return (found or lines or [""])[-1]


if _StockSlurmLauncher is not None:
    class SlurmLauncher(_CatnetSlurm, _StockSlurmLauncher):
        """hydra-submitit-launcher's SlurmLauncher, counting every job (module docstring)."""
