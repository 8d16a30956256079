"""python -m pipeline.reproduce in a copy of the repository (a git clone whose data comes through
DVC from the project's remote): a run made again from its record, from the run's own commit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_images, write_h5

from pipeline.common import ROOT

FAST = ["train.epochs=40", "model.hidden_sizes=[8,4]", "train.check_learned=false", "train.progress=false"]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("reproduce")]  # one clone, in one worker


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A clone of the project with its own store, its data pulled through DVC from the project's
    remote (its relative path made absolute for the clone, which lies elsewhere)."""
    from dvc.repo import Repo

    work = tmp_path_factory.mktemp("reproduce") / "project"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(work)], check=True)
    git(work, "config", "user.email", "test@example.com")
    git(work, "config", "user.name", "test")
    # the code under test is the project's as it is now, committed or not
    for name in git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0"):
        if name and (ROOT / name).is_file():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, work / name)
        elif name and (work / name).exists():
            (work / name).unlink()
    git(work, "add", "-A")
    if git(work, "status", "--porcelain"):
        git(work, "commit", "-qm", "the working tree under test")
    with Repo(str(ROOT)) as project:
        remotes = {n: c["url"] for n, c in project.config["remote"].items()}
    (work / ".dvc" / "config.local").write_text("".join(f"['remote \"{n}\"']\n    url = {u}\n"
                                                        for n, u in remotes.items()))
    subprocess.run([sys.executable, "-m", "dvc", "pull", "-q", "data/raw.dvc"], cwd=work, check=True)
    return work


def env_of(repo: Path, **extra: str) -> dict[str, str]:
    """What a user of the clone's own checkout has: its code first on the path."""
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{repo / 'src'}", **extra}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def uri(repo: Path) -> str:
    return f"tracking.uri=sqlite:///{repo.parent / 'store' / 'mlflow.db'}"


def train(repo: Path, *args: str, env: dict | None = None) -> str:
    """A run of ``python -m pipeline`` in the clone; its MLflow run id."""
    out = subprocess.run([sys.executable, "-m", "pipeline", *FAST, *args, uri(repo), "tracking.experiment=test"],
                         cwd=repo, env=env or env_of(repo), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return re.search(r"MLflow run ([0-9a-f]{32})", out.stdout + out.stderr).group(1)


def reproduce(repo: Path, run_id: str, *args: str, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-m", "pipeline.reproduce", f"run_id={run_id}", uri(repo), *args],
                          cwd=cwd or repo, env=env_of(repo), capture_output=True, text=True, timeout=600)


def client_of(repo: Path):
    from mlflow import MlflowClient

    return MlflowClient(uri(repo).split("=", 1)[1])


def weights(repo: Path, run_id: str, tmp_path: Path) -> dict[str, np.ndarray]:
    path = client_of(repo).download_artifacts(run_id, "weights.npz", str(tmp_path / run_id))
    with np.load(path) as f:
        return {k: f[k] for k in f}


@pytest.fixture(scope="module")
def clean_run(repo) -> str:
    """A run of the clone's clean HEAD, its BLAS on 2 threads."""
    return train(repo, "seed=5", env=env_of(repo, OPENBLAS_NUM_THREADS="2"))


def test_a_run_of_a_clean_commit_is_reproduced_exactly_and_linked_to_it(repo, clean_run):
    run_id = clean_run
    out = reproduce(repo, run_id, cwd=repo.parent)  # from outside the project, as a user may
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "reproduced exactly: weights.npz identical bit for bit" in out.stdout
    assert "BLAS: 2 threads (the run's)" in out.stdout
    tree = Path(re.search(r"code: the worktree's, (\S+) \(pipeline from (\S+),", out.stdout).group(1))
    assert f"pipeline from {tree}{os.sep}pipeline" in out.stdout  # the worktree's code, not the clone's
    assert "OpenBLAS kernel" in out.stdout or "BLAS: " in out.stdout
    new_id = re.search(r"new run: ([0-9a-f]{32})", out.stdout).group(1)
    client = client_of(repo)
    new, original = client.get_run(new_id), client.get_run(run_id)
    assert new.data.tags["catnet.reproduces"] == run_id and new.data.tags["catnet.reproduction"] == "identical"
    assert original.data.tags["catnet.reproduced_by"] == new_id
    assert new.info.status == "FINISHED" and new.info.experiment_id == original.info.experiment_id
    assert new.data.tags["mlflow.source.git.commit"] == original.data.tags["mlflow.source.git.commit"]
    assert new.data.tags["catnet.git.dirty"] == "False"
    assert not tree.exists()
    assert git(repo, "worktree", "list").count("\n") == 1  # the worktree is gone


def test_an_older_commit_is_reproduced_from_its_worktree_while_the_checkout_is_newer(repo, tmp_path):
    run_id = train(repo, "seed=6")
    older = git(repo, "rev-parse", "HEAD").strip()
    network = repo / "src" / "catnet" / "network.py"
    text = network.read_text()
    assert "* std).astype(dtype)" in text
    network.write_text(text.replace("* std).astype(dtype)", "* std * 1.01).astype(dtype)"))
    git(repo, "commit", "-qam", "wider initial weights")
    try:
        newer_id = train(repo, "seed=6")  # the newer code, same config: other weights
        assert not all(np.array_equal(a, b) for a, b in zip(weights(repo, run_id, tmp_path).values(),
                                                           weights(repo, newer_id, tmp_path).values()))
        out = reproduce(repo, run_id)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert f"of commit {older[:12]}" in out.stdout and "reproduced exactly" in out.stdout
        assert network.read_text().count("* 1.01") == 1  # the checkout was left as it was
    finally:
        git(repo, "reset", "-q", "--hard", older)


def test_a_run_from_a_dirty_tree_or_an_unknown_commit_is_refused_in_one_line(repo):
    readme = repo / "README.md"
    readme.write_text(readme.read_text() + "\nan edit\n")
    try:
        dirty_id = train(repo, "seed=7")
    finally:
        git(repo, "checkout", "README.md")
    out = reproduce(repo, dirty_id)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"catnet: error: run {dirty_id} was made from a dirty tree at commit "
        f"{git(repo, 'rev-parse', 'HEAD')[:12]} (catnet.git.dirty=True): the code that ran is in no commit"]

    from omegaconf import OmegaConf

    from catnet.errors import ConfigError
    from pipeline.reproduce import ReproduceConfig, reproduce as reproduce_in_process

    client_of(repo).set_tag(dirty_id, "catnet.git.dirty", "False")
    client_of(repo).set_tag(dirty_id, "mlflow.source.git.commit", "0123456789abcdef" * 2 + "01234567")
    cfg = OmegaConf.structured(ReproduceConfig(run_id=dirty_id))
    cfg.tracking.uri = uri(repo).split("=", 1)[1]
    with pytest.raises(ConfigError, match="its commit 0123456789ab is not in this repository"):
        reproduce_in_process(cfg)
    cfg.run_id = "f" * 32
    with pytest.raises(ConfigError, match=f"run_id={'f' * 32}: no run in sqlite:///"):
        reproduce_in_process(cfg)


def test_a_run_whose_data_changed_since_is_refused_before_training(repo, tmp_path):
    """A run may read files outside the project (data.train_path=<path>), which no commit holds:
    if they changed since, their digest is not the run's catnet.data.md5, and nothing is trained."""
    rng = np.random.default_rng(5)
    x, y = make_images(30, rng)
    train_h5 = write_h5(tmp_path / "mine_train.h5", x, y, "train")
    test_h5 = write_h5(tmp_path / "mine_test.h5", *make_images(10, rng), "test")
    run_id = train(repo, "seed=8", f"data.train_path={train_h5}", f"data.test_path={test_h5}")
    y[0] = 1 - y[0]
    write_h5(train_h5, x, y, "train")
    client = client_of(repo)
    before = len(client.search_runs([client.get_run(run_id).info.experiment_id]))
    out = reproduce(repo, run_id)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert f"is not the data the run read (catnet.data.md5 {client.get_run(run_id).data.tags['catnet.data.md5']})" \
        in out.stderr
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == before  # no run was made


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no other BLAS thread count to try")
def test_another_blas_thread_count_is_named_as_the_cause_of_a_difference(repo, clean_run):
    """OpenBLAS sums in another order with another thread count: the weights differ in their last
    bits and training carries that on. Reproducing with threads=1 a run of 2 threads says so."""
    assert client_of(repo).get_run(clean_run).data.tags["catnet.blas"].endswith(" 2 threads")
    out = reproduce(repo, clean_run, "threads=1")
    assert out.returncode in (0, 1), out.stdout[-2000:] + out.stderr[-2000:]
    if out.returncode == 1:
        assert "differs:" in out.stdout and "largest difference" in out.stdout
        assert re.search(r"BLAS: .* 2 threads -> .* 1 threads", out.stdout), out.stdout
        new_id = re.search(r"new run: ([0-9a-f]{32})", out.stdout).group(1)
        assert client_of(repo).get_run(new_id).data.tags["catnet.reproduction"] == "differs"
    else:
        assert "reproduced exactly" in out.stdout


def _commit_lock(repo: Path, old: str, new: str, message: str) -> str:
    """Commit requirements.lock with ``old`` replaced by ``new``; the commit."""
    lock = repo / "requirements.lock"
    assert old in lock.read_text()
    lock.write_text(lock.read_text().replace(old, new))
    git(repo, "commit", "-qam", message)
    return git(repo, "rev-parse", "HEAD").strip()


def test_a_run_made_before_the_lock_moved_is_reproduced_in_its_own_environment(repo, tmp_path):
    """A run made at a commit whose lock pins tabulate 0.9.0 (this checkout's: 0.10.0) is trained
    again in an environment built from that lock (.cache/envs/<digest>), exactly; the second
    reproduction reuses that environment (it says so, and its Python is the same file, not made
    again); env=current trains here and names the package that differs; a lock that cannot be
    installed, or a run of another Python, is refused in one line that names env=current."""
    from pipeline import envs

    pinned = "tabulate==0.10.0"
    head = git(repo, "rev-parse", "HEAD").strip()
    try:
        _commit_lock(repo, pinned, "tabulate==0.9.0", "the lock of last month")
        run_id = train(repo, "seed=9")
        old_lock = (repo / "requirements.lock").read_text()
        assert client_of(repo).get_run(run_id).data.tags["catnet.lock"] == envs.digest(old_lock)
        bad = _commit_lock(repo, "tabulate==0.9.0", "tabulate==0.0.404", "a lock no registry serves")
        bad_id = train(repo, "seed=9")
        git(repo, "reset", "-q", "--hard", head)  # the checkout moved on: its lock pins tabulate 0.10.0

        out = reproduce(repo, run_id)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        folder = repo / ".cache" / "envs" / envs.digest(old_lock)
        assert re.search(rf"environment: \.cache/envs/{envs.digest(old_lock)} \(requirements\.lock of commit \w+\), "
                         r"built in \d+ s", out.stdout), out.stdout
        assert "reproduced exactly" in out.stdout and f"Python of {folder}\n" in out.stdout
        version = subprocess.run([str(folder / "bin" / "python"), "-c",
                                  "import importlib.metadata as m; print(m.version('tabulate'))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        assert version == "0.9.0"
        python = (folder / "bin" / "python").lstat().st_ino

        again = reproduce(repo, run_id)
        assert again.returncode == 0 and "reproduced exactly" in again.stdout, again.stdout[-3000:]
        assert f"environment: .cache/envs/{envs.digest(old_lock)}" in again.stdout and "), reused" in again.stdout
        assert (folder / "bin" / "python").lstat().st_ino == python  # the same environment, not rebuilt

        here = reproduce(repo, run_id, "env=current")
        assert here.returncode == 0, here.stdout[-3000:] + here.stderr[-3000:]
        assert "environment: this one (env=current); it differs from the requirements.lock of commit" in here.stdout
        assert "tabulate 0.9.0 -> 0.10.0" in here.stdout

        refused = reproduce(repo, bad_id)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
        assert lines[0].startswith("catnet: error: the run's environment could not be built (pip install -r "
                                   "requirements.lock: ") and "tabulate==0.0.404" in lines[0], lines
        assert lines[0].endswith("env=current trains in this environment instead") and bad
        assert not (repo / ".cache" / "envs" / envs.digest(old_lock.replace("0.9.0", "0.0.404"))).exists()

        client_of(repo).set_tag(run_id, "catnet.versions", "python 3.99.1, numpy 2.4.6")
        other = reproduce(repo, run_id)
        assert other.returncode == 2 and other.stderr.strip().splitlines() == [
            f"catnet: error: the run was made with Python 3.99.1, this is Python {sys.version.split()[0]}: its "
            "environment cannot be built with this interpreter; env=current trains in this environment instead"]
    finally:
        git(repo, "reset", "-q", "--hard", head)


def test_the_environment_cache_keeps_those_used_last(tmp_path, monkeypatch):
    from pipeline import envs

    monkeypatch.setattr(envs, "CACHE", tmp_path)
    made = []
    for n, name in enumerate(("a", "b", "c", "d")):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".complete").write_text("")
        os.utime(tmp_path / name / ".complete", (1000 + n, 1000 + n))
        made.append(tmp_path / name)
    (tmp_path / ".e.building").mkdir()  # a build under way is not an environment
    removed = envs.prune(2, keep=tmp_path / "a")
    assert sorted(p.name for p in removed) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == [
        ".e.building", "a", "c", "d"]
