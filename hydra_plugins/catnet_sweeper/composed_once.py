"""``hydra/sweeper=catnet`` (the default): Hydra's basic sweeper, with each job's config composed once.

The basic sweeper composes every job's config before launching the batch, to refuse a bad
override before any job runs, and the basic launcher then composes it again for the job. Each
composition reads and merges every file of ``conf/`` (about 0.1 s here), so a sweep paid that
twice per job. This sweeper keeps the configs its check composed and hands each to the launcher
once, in the same process; a launcher that runs jobs elsewhere (joblib, Ray, submitit) receives
the loader without them and composes in the job's process, as before. Sweep syntax, batches and
the check are the basic sweeper's.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.types import HydraContext


@dataclass
class CatnetSweeperConf:
    _target_: str = "hydra_plugins.catnet_sweeper.composed_once.CatnetSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="catnet", node=CatnetSweeperConf, provider="catnet")


class ComposedOnce:
    """A config loader that returns the config of a job (master config, overrides) composed
    already, once; any other call, or a second request, goes to Hydra's loader. Not pickled with
    what it keeps: a job sent to another process composes its config there."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.kept: Dict[Any, Any] = {}  # (id of the master config, overrides) -> config
        # (no `from __future__ import annotations` here: Hydra's plugin scan imports this module
        # outside sys.modules, where a dataclass cannot resolve string annotations)

    def load_sweep_config(self, master_config: Any, sweep_overrides: List[str]) -> Any:
        key = (id(master_config), tuple(sweep_overrides))
        if key in self.kept:
            return self.kept.pop(key)
        config = self.loader.load_sweep_config(master_config, sweep_overrides)
        self.kept[key] = config
        return config

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loader"], name)

    def __getstate__(self) -> Dict[str, Any]:
        return {"loader": self.loader, "kept": {}}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)


class CatnetSweeper(BasicSweeper):
    def setup(self, *, hydra_context: HydraContext, task_function: Any, config: Any) -> None:
        context = HydraContext(config_loader=ComposedOnce(hydra_context.config_loader), callbacks=hydra_context.callbacks)
        super().setup(hydra_context=context, task_function=task_function, config=config)
