"""The default sweeper (hydra/sweeper=catnet): Hydra's basic sweeper, each job's config composed once."""

from __future__ import annotations

import pytest
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


def _sweep(tmp_path, monkeypatch, arguments, task):
    """Run the default sweeper in this process over conf/, each job calling ``task(config)``;
    returns (the counting loader, the master config, the sweeper)."""
    monkeypatch.chdir(tmp_path)
    state = Singleton.get_state()
    try:
        loader = CountingLoader()
        cfg = loader.load_configuration("config", [f"hydra.sweep.dir={tmp_path}", "hydra.callbacks={}",
                                                   "hydra.job.chdir=false"], run_mode=RunMode.MULTIRUN)
        HydraConfig.instance().set_config(cfg)
        assert cfg.hydra.sweeper._target_.endswith(".CatnetSweeper")
        from hydra_plugins.catnet_sweeper.composed_once import CatnetSweeper

        sweeper = CatnetSweeper(max_batch_size=None)
        sweeper.setup(hydra_context=HydraContext(config_loader=loader, callbacks=Callbacks(cfg)), task_function=task,
                      config=cfg)
        sweeper.sweep(arguments)
    finally:
        Singleton.set_state(state)
    return loader, cfg, sweeper


def test_the_default_sweeper_runs_every_combination_composing_each_job_once(tmp_path, monkeypatch):
    jobs = []
    loader, _, _ = _sweep(tmp_path, monkeypatch, ["seed=0,1", "train.lr=0.1,0.2"],
                          lambda c: jobs.append((c.seed, c.train.lr, HydraConfig.get().job.num)))
    assert sorted(jobs) == [(0, 0.1, 0), (0, 0.2, 1), (1, 0.1, 2), (1, 0.2, 3)]
    # Hydra composed the first job's config, once; the others only change its values
    assert loader.composed == [("seed=0", "train.lr=0.1")]


def test_a_sweep_that_repeats_a_job_gives_each_job_its_own_config(tmp_path, monkeypatch):
    """seed=0,0,1: the check keeps one config per job and the launcher takes each once (the
    same config twice was read-only at its second job: Hydra's launcher could not number it)."""
    jobs, seen = [], []
    loader, cfg, sweeper = _sweep(tmp_path, monkeypatch, ["seed=0,0,1"],
                                  lambda c: (jobs.append((c.seed, HydraConfig.get().job.num)), seen.append(c)))
    assert jobs == [(0, 0), (0, 1), (1, 2)] and len({id(c) for c in seen}) == 3  # held: ids are not reused
    assert loader.composed == [("seed=0",)]  # Hydra composed the first; the others are copies
    assert sweeper.hydra_context.config_loader.kept == {(id(cfg), ("seed=0",)): [], (id(cfg), ("seed=1",)): []}


def _containers(once, loader, master, jobs):
    from omegaconf import OmegaConf

    for overrides in jobs:
        fast, composed = once.load_sweep_config(master, overrides), loader.load_sweep_config(master, overrides)
        yield (OmegaConf.to_container(fast, resolve=False), OmegaConf.is_struct(fast), OmegaConf.is_readonly(fast.hydra)), \
              (OmegaConf.to_container(composed, resolve=False), OmegaConf.is_struct(composed),
               OmegaConf.is_readonly(composed.hydra))


@pytest.mark.slow
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


WORKER = """
import json, pickle, sys
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.plugins import Plugins
from hydra.types import RunMode
from omegaconf import OmegaConf
from pipeline.common import CONF_DIR

class Counting(ConfigLoaderImpl):
    def __init__(self):
        super().__init__(config_search_path=create_config_search_path(CONF_DIR))
        self.composed = []
    def load_sweep_config(self, master_config, sweep_overrides):
        self.composed.append(list(sweep_overrides))
        return super().load_sweep_config(master_config, sweep_overrides)

Plugins.instance()  # its scan imports the plugin modules anew: take the sweeper's class after it
from hydra_plugins.catnet_sweeper.composed_once import ComposedOnce
loader = Counting()
master = loader.load_configuration("config", ["hydra.callbacks={}"], run_mode=RunMode.MULTIRUN)
once = ComposedOnce(loader)
once.load_sweep_config(master, ["seed=0", "train.lr=0.1"])  # the sweeper's check, in the sweep's process
job = ["seed=3", "train.lr=0.2"]
expected = OmegaConf.to_container(Counting().load_sweep_config(master, job), resolve=False)
out = {}
for name, payload in (("with_master", (master, once)), ("alone", (pickle.loads(pickle.dumps(master)), once))):
    worker_master, worker_once = pickle.loads(pickle.dumps(payload))  # what a launcher's job carries
    worker_once.loader.composed.clear()
    got = worker_once.load_sweep_config(worker_master, job)
    out[name] = {"same": OmegaConf.to_container(got, resolve=False) == expected,
                 "composed": worker_once.loader.composed}
print(json.dumps(out))
"""


def test_a_job_in_another_process_gets_its_config_from_the_first_jobs_when_it_changes_only_values():
    """A launcher's job (joblib) pickles the loader with its master config: there, a job that
    changes only values gets the config Hydra would compose without composing it; a loader that
    arrives without that master config composes the job's config anew, as Hydra does. In a
    process of its own: Hydra's loader no longer pickles once pytest's plugin scan has run."""
    import json
    import subprocess
    import sys

    from pipeline.common import ROOT

    proc = subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["with_master"] == {"same": True, "composed": []}
    assert out["alone"] == {"same": True, "composed": [["seed=3", "train.lr=0.2"]]}


def test_a_job_its_launcher_lost_is_counted_failed_and_the_sweep_goes_on():
    """What the Ray and SLURM launchers return for a job their engine lost (search.lost), without
    either engine: a failed trial for the sweeper, which goes on; the sweep counts it failed (exit 1)
    beside a job that came back, a pruned one and a diverged one (results, not failures)."""
    from hydra.core.utils import JobReturn, JobStatus

    from pipeline import search
    from pipeline.tracking import parent

    job = search.lost(["seed=3"], "the Ray task was lost: WorkerCrashedError: the worker died")
    assert job.status == JobStatus.COMPLETED and job.overrides == ["seed=3"]
    assert job.return_value["state"] == "failed" and "WorkerCrashedError" in job.return_value["reason"]
    others = []
    for value in (0.75, search.ended("pruned", value=0.5, step=3), search.ended("failed", diverged=True)):
        others.append(JobReturn(overrides=["seed=4"], status=JobStatus.COMPLETED))
        others[-1].return_value = value
    result = parent.summary_of([parent.returned(j) for j in [job, *others]])
    counts = result["counts"]
    assert (counts["jobs"], counts["finished"], counts["failed"], counts["pruned"], counts["diverged"]) == (4, 1, 1, 1, 1)
    assert result["status"] == "FAILED" and result["reason"] == "1 of 4 jobs failed"
