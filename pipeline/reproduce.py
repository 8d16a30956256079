"""``python -m pipeline.reproduce run_id=<id>`` (or ``catnet-reproduce run_id=<id>``): make a
recorded run again from its record, and say whether it came out the same.

1. The run must be FINISHED, made from a clean tree (tag ``catnet.git.dirty=False``) at a commit
   of this repository, with its composed config (artifact ``config.yaml``), its data digest (tag
   ``catnet.data.md5``) and its weights (artifact ``weights.npz``).
2. The commit is checked out in a temporary git worktree. Everything below runs the worktree's
   code (``PYTHONPATH`` puts it before the project's editable install; the first step prints the
   files ``pipeline`` and ``catnet`` were imported from, and refuses others).
3. The commit's data comes through DVC (this project's cache, then its remote), and its digest,
   computed by the commit's own code, must equal the run's ``catnet.data.md5``.
4. The recorded config is composed over the commit's ``conf/`` (it sets every value) and trained
   and evaluated by ``python -m pipeline`` in the worktree, into the run's store and experiment.
   The new run is tagged ``catnet.reproduces=<id>``; the original gets ``catnet.reproduced_by``.
5. It trains in the run's environment: the packages its commit's ``requirements.lock`` pins,
   installed in ``.cache/envs/<digest>`` and reused while that lock is (pipeline/envs.py); the
   run's Python version must be this one. ``env=current`` trains with this environment's
   packages instead and names those that differ from the lock.
6. ``weights.npz`` is compared bit for bit, then the metrics. What differs is printed with what
   is known of the cause: package versions (``catnet.versions``, the lock), the BLAS, its kernel
   or thread count (``catnet.blas``), the host (``catnet.host``).

Exit status: 0 reproduced exactly, 1 trained but differs, 2 could not reproduce.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import hydra
import numpy as np
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from catnet.errors import ConfigError
from pipeline.common import CONF_DIR, ROOT, log, run_cli, run_main
from pipeline.config import TrackingConfig

REPRODUCES_TAG = "catnet.reproduces"  # on the new run: the run it reproduces
REPRODUCED_BY_TAG = "catnet.reproduced_by"  # on the original: its latest reproduction
RESULT_TAG = "catnet.reproduction"  # on the new run: identical | differs
CAUSES = {"catnet.versions": "package versions", "catnet.blas": "BLAS", "catnet.host": "host"}


@dataclass
class ReproduceConfig:
    run_id: Optional[str] = None  # the run to make again
    keep: bool = False  # keep the worktree (its path is printed) instead of removing it
    threads: Optional[int] = None  # BLAS threads; null: as many as the run's catnet.blas says it had
    # (OpenBLAS's kernel too is the run's: OPENBLAS_CORETYPE)
    env: str = "recorded"  # recorded: its commit's requirements.lock, built in .cache/envs; current: this one
    envs_kept: int = 2  # the environments .cache/envs keeps (the ones used last; each about 0.7 GB)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


ConfigStore.instance().store(name="reproduce_schema", node=ReproduceConfig)


def reproduce(cfg: DictConfig) -> int:
    """Reproduce run ``cfg.run_id``; the exit status (0 identical, 1 differs). What stops it
    raises a ConfigError (exit 2)."""
    from pipeline.tracking import query, reuse, store

    from catnet.errors import check_choice

    check_choice("env", cfg.env, ("recorded", "current"))
    if cfg.envs_kept < 1:
        raise ConfigError(f"envs_kept={cfg.envs_kept}: must be at least 1")
    if not cfg.run_id:
        raise ConfigError("run_id=<id> is required: the run to reproduce (the MLflow UI or python -m pipeline.compare "
                          "show run ids)")
    client = store.client(cfg)
    run = query.run_of(client, str(cfg.run_id))
    if reuse.origin(run) != run.info.run_id:  # a sweep's link: the run that trained
        log.info("reproduce: run %s links run %s, which trained: reproducing that one", run.info.run_id,
                 reuse.origin(run))
        run = client.get_run(reuse.origin(run))
    commit, digest = refusal(run, client)
    experiment = client.get_experiment(run.info.experiment_id).name
    original = f"run {run.info.run_id} '{run.info.run_name}'"
    print(f"reproduce: {original} of commit {commit[:12]}, experiment {experiment!r} in {client.tracking_uri}")
    with tempfile.TemporaryDirectory(prefix="catnet-reproduce-") as scratch, \
            worktree(commit, Path(scratch) / "worktree", cfg.keep) as tree:
        config_file = Path(scratch) / "config.yaml"
        client.download_artifacts(run.info.run_id, "config.yaml", scratch)
        data_of_commit(tree, commit)
        python, causes = environment(cfg, tree, run, commit)
        imported, md5 = in_worktree(tree, config_file, python)
        print(f"  code: the worktree's, {tree} (pipeline from {imported['pipeline']}, catnet from {imported['catnet']}), "
              f"Python of {imported['prefix']}")
        if md5 != digest:
            raise ConfigError(f"run {run.info.run_id}: the data its config reads at commit {commit[:12]} (md5 {md5}) "
                              f"is not the data the run read (catnet.data.md5 {digest}): files changed since")
        print(f"  data: md5 {md5} = the run's catnet.data.md5 (the DVC-tracked data of commit {commit[:12]}, "
              "and any files its config names)")
        kernel, recorded = recorded_blas(run)
        threads = cfg.threads or recorded
        print(f"  BLAS: {threads or 'default'} threads" + (" (the run's)" if threads and not cfg.threads else "")
              + (f", OpenBLAS kernel {kernel} (the run's)" if kernel else ""))
        new_id = train(tree, config_file, client, run, experiment, worktree_env(tree, threads, kernel), python)
    new = client.get_run(new_id)
    same, report = compare(client, run, new, causes)
    client.set_tag(new_id, REPRODUCES_TAG, run.info.run_id)
    client.set_tag(new_id, RESULT_TAG, "identical" if same else "differs")
    client.set_tag(run.info.run_id, REPRODUCED_BY_TAG, new_id)
    print(f"  new run: {new_id} '{new.info.run_name}' (tag {REPRODUCES_TAG}={run.info.run_id})")
    print("\n".join(report))
    return 0 if same else 1


def environment(cfg: DictConfig, tree: Path, run, commit: str) -> tuple[str, list[str]]:
    """(the Python that trains, causes of a difference it brings), its one line printed: the run's
    environment, built from its commit's requirements.lock or reused (pipeline/envs.py), or with
    ``env=current`` this one, with the packages in which it differs from that lock."""
    from pipeline import envs

    lock = tree / "requirements.lock"
    if cfg.env == "current":
        differ = envs.differences(lock.read_text()) if lock.exists() else []
        print("  environment: this one (env=current)" + (f"; it differs from the requirements.lock of commit "
                                                         f"{commit[:12]} in: {', '.join(differ)}" if differ else
                                                         ", as the commit's requirements.lock pins it"))
        return sys.executable, ([f"    packages (requirements.lock -> this environment): {', '.join(differ)}"]
                                if differ else [])
    if not lock.exists():
        raise ConfigError(f"commit {commit[:12]} has no requirements.lock: its environment cannot be built; "
                          f"{envs.TRY_CURRENT}")
    python, line = envs.ensure(lock.read_text(), envs.recorded_python(run.data.tags.get("catnet.versions", "")),
                               int(cfg.envs_kept), commit)
    print(f"  {line}")
    return str(python), []


def refusal(run, client) -> tuple[str, str]:
    """(commit, data digest) of a run that can be reproduced; else a ConfigError saying why not."""
    tags, name = run.data.tags, f"run {run.info.run_id}"
    if tags.get("catnet.sweep") == "parent":
        raise ConfigError(f"{name} is a sweep's parent, which trains nothing: reproduce one of its children")
    if run.info.status != "FINISHED":
        raise ConfigError(f"{name} is {run.info.status}, not FINISHED: there are no results to compare with")
    commit = tags.get("mlflow.source.git.commit")
    if not commit:
        raise ConfigError(f"{name} records no git commit (mlflow.source.git.commit): it was not made in a checkout")
    if tags.get("catnet.git.dirty") != "False":
        raise ConfigError(f"{name} was made from a dirty tree at commit {commit[:12]} (catnet.git.dirty="
                          f"{tags.get('catnet.git.dirty')}): the code that ran is in no commit")
    if _git("cat-file", "-e", f"{commit}^{{commit}}", check=False) is None:
        raise ConfigError(f"{name}: its commit {commit[:12]} is not in this repository ({ROOT.name}): "
                          "git fetch the branch it was made on")
    if not tags.get("catnet.data.md5"):
        raise ConfigError(f"{name} records no data digest (catnet.data.md5): its data cannot be checked")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    missing = sorted({"config.yaml", "weights.npz"} - artifacts)
    if missing:
        raise ConfigError(f"{name} has no {' and no '.join(missing)} artifact: nothing to compose or compare")
    return commit, tags["catnet.data.md5"]


def _git(*args: str, cwd: Path = ROOT, check: bool = True) -> str | None:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        if check:
            raise ConfigError(f"git {' '.join(args)}: {(out.stderr.strip().splitlines() or ['failed'])[-1]}")
        return None
    return out.stdout


@contextmanager
def worktree(commit: str, path: Path, keep: bool) -> Iterator[Path]:
    """A git worktree of ``commit`` at ``path``, removed afterwards (kept with ``keep``)."""
    _git("worktree", "add", "--detach", "--quiet", str(path), commit)
    try:
        yield path
    finally:
        if keep:
            print(f"  worktree kept: {path} (git worktree remove --force {path})")
        else:
            _git("worktree", "remove", "--force", str(path), check=False)
            _git("worktree", "prune", check=False)


def data_of_commit(tree: Path, commit: str) -> None:
    """``dvc pull`` of the worktree's data, from this project's cache, else its remotes (their
    paths made absolute: a relative remote names a folder beside the project, not the worktree)."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        remotes = {name: conf["url"] for name, conf in repo.config["remote"].items()}
        cache = repo.cache.local_cache_dir
    local = [f"[cache]\n    dir = {cache}\n"] + [f"['remote \"{n}\"']\n    url = {u}\n" for n, u in remotes.items()]
    (tree / ".dvc" / "config.local").write_text("".join(local))
    targets = [str(p.relative_to(tree)) for p in sorted(tree.glob("data/**/*.dvc"))]
    out = subprocess.run([sys.executable, "-m", "dvc", "pull", "--quiet", *targets], cwd=tree, capture_output=True,
                         text=True)
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["dvc pull failed"])[-1]
        raise ConfigError(f"could not bring the data of commit {commit[:12]} through DVC: {why}")


# Run by the worktree's Python: which code it imports, and the digest of the data the run's config reads
_DIGEST = """
import json, sys
from omegaconf import OmegaConf
import catnet, pipeline
from pipeline import config, load
cfg = config.prepare(OmegaConf.load(sys.argv[1]))
print(json.dumps({"pipeline": pipeline.__file__, "catnet": catnet.__file__, "prefix": sys.prefix,
                  "md5": load.digest(load.run(cfg))}))
"""


def worktree_env(tree: Path, threads: int | None = None, kernel: str | None = None) -> dict[str, str]:
    """The environment that makes Python import the worktree's ``pipeline``, ``catnet`` and
    Hydra plugins before the project's own (the editable install's finder comes after sys.path),
    with ``threads`` BLAS threads and OpenBLAS's ``kernel``."""
    path = os.pathsep.join([str(tree), str(tree / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path}
    if threads:
        env.update({k: str(threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    if kernel:
        env["OPENBLAS_CORETYPE"] = kernel
    return env


def recorded_blas(run) -> tuple[str | None, int | None]:
    """(OpenBLAS kernel, threads) the run had when it opened, from its tag catnet.blas
    (``openblas 0.3.31 Haswell 2 threads``); None for what it does not say."""
    import re

    found = re.match(r"openblas \S+ (\w+) (\d+) threads", run.data.tags.get("catnet.blas", ""))
    if found:
        return found.group(1), int(found.group(2))
    threads = re.search(r"(\d+) threads", run.data.tags.get("catnet.blas", ""))
    return None, int(threads.group(1)) if threads else None


def in_worktree(tree: Path, config_file: Path, python: str = sys.executable) -> tuple[dict[str, str], str]:
    """({module: file it was imported from}, data md5) as the worktree's code computes them."""
    out = subprocess.run([python, "-c", _DIGEST, str(config_file)], cwd=tree, env=worktree_env(tree),
                         capture_output=True, text=True)
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["failed"])[-1]
        raise ConfigError(f"the worktree's code could not read the run's data: {why}")
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    imported = {m: answer[m] for m in ("pipeline", "catnet", "prefix")}
    for module, file in imported.items():
        if module != "prefix" and not Path(file).resolve().is_relative_to(tree.resolve()):
            raise ConfigError(f"the worktree's Python imported {module} from {file}, not from the worktree {tree}")
    return imported, answer["md5"]


def train(tree: Path, config_file: Path, client, run, experiment: str, env: dict[str, str],
          python: str = sys.executable) -> str:
    """Train and evaluate the recorded config in the worktree, into the run's store and
    experiment; the new run's id. The config is a primary config whose defaults are the commit's
    own ``config`` (Hydra's settings) and whose values are all the recorded ones; ``env`` sets the
    BLAS's threads and kernel, which change the bits of its sums."""
    recorded = yaml.safe_load(config_file.read_text())
    primary = config_file.parent / "recorded_run.yaml"  # a name conf/ does not use
    primary.write_text(yaml.safe_dump({"defaults": ["config", "_self_"], **recorded}, sort_keys=False))
    name = f"reproduce {run.info.run_name}".replace("'", "")
    overrides = [f"tracking.uri='{client.tracking_uri}'", f"tracking.experiment='{experiment}'", f"tracking.run_name='{name}'"]
    started = int(time.time() * 1000) - 1
    out = subprocess.run([python, "-m", "pipeline", "--config-dir", str(config_file.parent),
                          "--config-name", "recorded_run", *overrides], cwd=tree, env=env)
    if out.returncode != 0:
        raise ConfigError(f"training at commit {run.data.tags['mlflow.source.git.commit'][:12]} failed "
                          f"(exit {out.returncode}; its messages are above)")
    return _new_run(client, run, started, name)


def _new_run(client, run, started: int, name: str) -> str:
    from pipeline.tracking import query

    found = query.runs_since(client, run.info.experiment_id, started, name,
                             {"mlflow.source.git.commit": run.data.tags["mlflow.source.git.commit"]})
    if not found:
        raise ConfigError(f"training finished but its run '{name}' is not in the store")
    return found[0]


def compare(client, run, new, causes: list[str] | None = None) -> tuple[bool, list[str]]:
    """(identical, lines saying so or what differs and what is known of why; ``causes``: more of
    those, the environment's)."""
    with tempfile.TemporaryDirectory(prefix="catnet-compare-") as tmp:
        a = dict(np.load(client.download_artifacts(run.info.run_id, "weights.npz", f"{tmp}/a"), allow_pickle=False))
        b = dict(np.load(client.download_artifacts(new.info.run_id, "weights.npz", f"{tmp}/b"), allow_pickle=False))
    weights = weight_differences(a, b)
    old, now = run.data.metrics, new.data.metrics
    metrics = [f"    {k}: {old.get(k)} -> {now.get(k)}" for k in sorted(set(old) | set(now))
               if not _same(old.get(k), now.get(k))]
    if not weights and not metrics:
        return True, [f"reproduced exactly: weights.npz identical bit for bit ({len(a)} arrays), "
                      f"{len(old)} metrics equal"]
    lines = ["differs:"] + (weights or ["  weights.npz: identical bit for bit"])
    lines += [f"  metrics: {len(metrics)} of {len(set(old) | set(now))} differ"] + metrics
    causes = [f"    {label}: {run.data.tags.get(tag)} -> {new.data.tags.get(tag)}" for tag, label in CAUSES.items()
              if run.data.tags.get(tag) != new.data.tags.get(tag)] + (causes or [])
    lines += (["  known differences:"] + causes if causes
              else ["  no known cause: the same package versions, BLAS (kernel, threads) and host"])
    return False, lines


def weight_differences(a: dict, b: dict) -> list[str]:
    """Lines naming what differs between two weights.npz (no lines: identical bit for bit)."""
    if set(a) != set(b):
        return [f"  weights.npz: arrays {sorted(a)} -> {sorted(b)}"]
    differ = [k for k in sorted(a) if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
              or a[k].tobytes() != b[k].tobytes()]
    if not differ:
        return []
    lines = [f"  weights.npz: {len(differ)} of {len(a)} arrays differ"]
    for k in differ:
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or a[k].dtype.kind not in "fc":
            lines.append(f"    {k}: {a[k].dtype}{a[k].shape} -> {b[k].dtype}{b[k].shape}")
        else:
            gap = np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))
            lines.append(f"    {k}: largest difference {gap.max():.3g}, {int((gap > 0).sum())} of {gap.size} "
                         "values differ")
    return lines


def _same(x, y) -> bool:
    return x == y or (x is not None and y is not None and np.isnan(x) and np.isnan(y))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="reproduce")
def main(cfg: DictConfig) -> None:
    sys.exit(run_cli(reproduce, cfg, validate=False))


if __name__ == "__main__":
    run_main(main)
