"""``hydra/launcher=ray_cluster``: a sweep's jobs on an existing Ray cluster (Hydra finds launchers
only under the ``hydra_plugins`` namespace, hence this folder).

hydra-ray-launcher's local launcher assumes it starts Ray itself: it passes resources that Ray
refuses when connecting to a running cluster, its jobs learn the sweep's parent run only through
the driver's environment (which a cluster's workers do not inherit), and each job resolves the
sweep folder (``${now:...}``) anew where it runs. This launcher, its subclass, connects to the
cluster at ``hydra.launcher.ray.init.address`` (``auto``, ``<host>:<port>`` or ``ray://<host>:10001``)
with nothing but the address and a ``runtime_env`` that carries what each job needs (the parent
run, the swept keys), and gives every job the sweep folder as the driver resolved it, absolute.
Each job writes its own run (its outcome) to the store; a task Ray lost is a failed job. Each node needs
the project's checkout at the same path and its data (``dvc pull``); the record goes to
``tracking.uri``, which must be a server every node reaches (pipeline/sweep.py refuses a local
store for a cluster on another host).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Sequence

from hydra.core.utils import JobReturn
from omegaconf import OmegaConf, open_dict

try:  # Hydra imports every module under hydra_plugins at start-up: without the cluster extra, no class
    from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher
except ImportError:
    RayLauncher = None

log = logging.getLogger(__name__)
CARRIED_ENV = ("CATNET_MLFLOW_PARENT_RUN_ID", "CATNET_SWEPT_KEYS",  # set by pipeline/sweep.py
               "OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS")  # and by pipeline/blas.py: every node sums alike
_CONNECTING = threading.Lock()  # the Optuna search launches its trials from several threads


class _RayClusterLauncher:
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray
        from hydra.core.singleton import Singleton
        from hydra.core.utils import configure_log, filter_overrides, setup_globals
        from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        init = OmegaConf.to_container(self.ray_cfg.init, resolve=True) or {}
        env = dict((init.get("runtime_env") or {}).get("env_vars") or {})
        env.update({k: os.environ[k] for k in CARRIED_ENV if k in os.environ})
        init["runtime_env"] = {**(init.get("runtime_env") or {}), "env_vars": env}
        with _CONNECTING:
            if not ray.is_initialized():
                log.info("Ray: connecting to the cluster at %s", init.get("address"))
                ray.init(**init)
        log.info("Ray cluster launcher: %d jobs, sweep output dir %s", len(job_overrides), sweep_dir)
        runs = []
        for idx, overrides in enumerate(job_overrides, initial_job_idx):
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"job_id_for_{idx}"
                sweep_config.hydra.job.num = idx
                sweep_config.hydra.sweep.dir = str(sweep_dir)  # resolved here, once, for every node
            runs.append(launch_job_on_ray(self.hydra_context, self.ray_cfg.remote, sweep_config,
                                          self.task_function, Singleton.get_state()))
        return [self._returned(ray, run, overrides) for run, overrides in zip(runs, job_overrides)]

    def _returned(self, ray, run, overrides: Sequence[str]) -> JobReturn:
        """The job's return. A task Ray lost (its worker or node died) is a failed job, and the
        sweep goes on."""
        from pipeline import search

        try:
            return ray.get(run)
        except Exception as e:  # noqa: BLE001 - ray.exceptions.RayError and what it wraps
            return search.lost(overrides, f"the Ray task was lost: {type(e).__name__}: "
                                          f"{(str(e).splitlines() or [''])[0][:300]}")


if RayLauncher is not None:
    class RayClusterLauncher(_RayClusterLauncher, RayLauncher):
        """hydra-ray-launcher's RayLauncher, connecting to an existing cluster (module docstring)."""
