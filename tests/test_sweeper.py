"""The default sweeper (hydra/sweeper=catnet): Hydra's basic sweeper, each job's config composed once."""

from __future__ import annotations

import pickle

from hydra._internal.callbacks import Callbacks
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.types import HydraContext, RunMode

from pipeline.common import CONF_DIR


class CountingLoader(ConfigLoaderImpl):
    """Hydra's own config loader, counting the job configs it composes."""

    def __init__(self) -> None:
        from hydra.core.plugins import Plugins

        Plugins.instance()  # its first scan imports Hydra's plugin modules anew: make the loader after it
        super().__init__(config_search_path=create_config_search_path(CONF_DIR))
        self.composed: list[tuple[str, ...]] = []

    def load_sweep_config(self, master_config, sweep_overrides):
        self.composed.append(tuple(sweep_overrides))
        return super().load_sweep_config(master_config, sweep_overrides)


def test_the_default_sweeper_runs_every_combination_composing_each_job_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = Singleton.get_state()
    try:
        loader = CountingLoader()
        cfg = loader.load_configuration("config", [f"hydra.sweep.dir={tmp_path}", "hydra.callbacks={}",
                                                   "hydra.job.chdir=false"], run_mode=RunMode.MULTIRUN)
        HydraConfig.instance().set_config(cfg)
        assert cfg.hydra.sweeper._target_.endswith(".CatnetSweeper")
        from hydra_plugins.catnet_sweeper.composed_once import CatnetSweeper

        jobs = []
        sweeper = CatnetSweeper(max_batch_size=None)
        sweeper.setup(hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks(cfg)),
                      task_function=lambda c: jobs.append((c.seed, c.train.lr, HydraConfig.get().job.num)),
                      config=cfg)
        sweeper.sweep(["seed=0,1", "train.lr=0.1,0.2"])
    finally:
        Singleton.set_state(state)
    assert sorted(jobs) == [(0, 0.1, 0), (0, 0.2, 1), (1, 0.1, 2), (1, 0.2, 3)]
    # Hydra composed the first job's config, once; the others only change its values
    assert loader.composed == [("seed=0", "train.lr=0.1")]


def _containers(once, loader, master, jobs):
    from omegaconf import OmegaConf

    for overrides in jobs:
        fast, composed = once.load_sweep_config(master, overrides), loader.load_sweep_config(master, overrides)
        yield (OmegaConf.to_container(fast, resolve=False), OmegaConf.is_struct(fast), OmegaConf.is_readonly(fast.hydra)), \
              (OmegaConf.to_container(composed, resolve=False), OmegaConf.is_struct(composed),
               OmegaConf.is_readonly(composed.hydra))


def test_a_job_that_changes_only_values_gets_the_config_hydra_would_compose(tmp_path, monkeypatch):
    """The first job's config with another job's values is, to the last Hydra field, the config
    Hydra composes for that job; a job that changes a config group, adds a key or sets a dict
    is composed by Hydra."""
    from hydra_plugins.catnet_sweeper.composed_once import ComposedOnce

    monkeypatch.chdir(tmp_path)
    loader = CountingLoader()
    master = loader.load_configuration("config", ["hydra.callbacks={}"], run_mode=RunMode.MULTIRUN)
    once = ComposedOnce(loader)
    values = [["seed=0", "train.lr=0.1", "model.hidden_sizes=[64,16]", "tracking.run_name=a", "model=seed"],
              ["seed=1", "train.lr=0.2", "model.hidden_sizes=[8]", "tracking.run_name='x=${seed}'", "model=seed"],
              ["seed=2", "train.lr=1e-3", "model.hidden_sizes=[]", "tracking.run_name=null", "model=seed"],
              ["seed=3", "train.lr=0.1", "model.hidden_sizes=[64,16]", "tracking.run_name='a b,c'", "model=seed"]]
    for fast, composed in _containers(once, loader, master, values):
        assert fast == composed
    assert len(loader.composed) == 1 + len(values)  # the first job by the sweeper, then each by the test

    loader.composed.clear()
    others = [["seed=0", "model=deep", "model.hidden_sizes=[64,16]", "tracking.run_name=a", "model=seed"],
              ["seed=0", "train.lr=0.1", "+extra=1", "tracking.run_name=a", "model=seed"],
              ["seed=0", "train.lr=0.1", "model.hidden_sizes=[64,16]", "tracking.run_name=a", "model=deep"],
              ["seed=0", "train={lr: 0.5}", "model.hidden_sizes=[64,16]", "tracking.run_name=a", "model=seed"]]
    for fast, composed in _containers(once, loader, master, others):
        assert fast == composed
    assert len(loader.composed) == 2 * len(others)  # Hydra composed each, for the sweeper and the test

    once = ComposedOnce(loader)  # a dict is merged into what is there: the first job's would leak
    dicts = [["sweep={reuse: false, direction: minimize}"], ["sweep={reuse: true}"]]
    for fast, composed in _containers(once, loader, master, dicts):
        assert fast == composed


class Composer:
    """Stands for Hydra's loader where it must be pickled (Hydra's own, once its plugin scan has
    imported its modules anew, no longer pickles in one pytest process): a new dict per job."""

    def __init__(self) -> None:
        self.composed = 0

    def load_sweep_config(self, master_config, sweep_overrides):
        self.composed += 1
        return {"overrides": list(sweep_overrides)}


def test_a_loader_sent_to_another_process_carries_no_composed_config():
    from hydra_plugins.catnet_sweeper.composed_once import ComposedOnce

    master = {}
    once = ComposedOnce(Composer())
    first = once.load_sweep_config(master, ["seed=5"])
    copy = pickle.loads(pickle.dumps(once))
    assert copy.kept == {} and copy.first is None
    assert copy.load_sweep_config(master, ["seed=5"]) == first and copy.loader.composed == 2  # composed anew there
    assert once.load_sweep_config(master, ["seed=5"]) is first and once.kept == {}  # here: handed over once
    assert once.loader.composed == 1
