"""Shared fixtures: small HDF5 files made on the spot, the composed config, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pipeline  # noqa: F401 - first: it chooses the BLAS kernel and threads before NumPy loads (pipeline/blas.py)
import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from pipeline.common import CONF_DIR, ROOT

REAL_TRAIN = ROOT / "data/raw/train_catvnoncat.h5"
REAL_TEST = ROOT / "data/raw/test_catvnoncat.h5"
IN_CI = bool(os.environ.get("CI"))  # .ci/run sets it: there, what a test needs must be present

# tests on the real data: skipped on a machine without `dvc pull`, never under CI, where they run
# (and fail on the missing files) rather than pass by being skipped
needs_data = pytest.mark.skipif(not REAL_TRAIN.exists() and not IN_CI,
                                reason="needs `dvc pull` of data/raw (under CI=1 these fail instead)")


def import_or_skip(name: str, reason: str):
    """pytest.importorskip, except under CI, where a missing module fails the test."""
    if IN_CI:
        import importlib

        return importlib.import_module(name)
    return pytest.importorskip(name, reason=reason)


def write_h5(path: Path, x, y, split: str = "train", extra: dict | None = None) -> Path:
    """An HDF5 file in the catvnoncat schema: <split>_set_x, <split>_set_y, list_classes."""
    with h5py.File(path, "w") as f:
        if x is not None:
            f[f"{split}_set_x"] = x
        if y is not None:
            f[f"{split}_set_y"] = y
        f["list_classes"] = np.array([b"non-cat", b"cat"])
        for k, v in (extra or {}).items():
            f[k] = v
    return path


def make_images(n: int, rng: np.random.Generator, shape=(64, 64, 3)) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images, both classes present: cats are brighter, so a net can learn them."""
    y = np.arange(n) % 2
    x = rng.integers(0, 128, size=(n, *shape)).astype(np.uint8)
    x[y == 1] += 100
    return x, y.astype(np.int64)


@pytest.fixture
def small_data(tmp_path) -> tuple[Path, Path]:
    """A small learnable data set in two files (train 40 images, test 12), 8x8x3 images."""
    rng = np.random.default_rng(0)
    x, y = make_images(40, rng, (8, 8, 3))
    xt, yt = make_images(12, rng, (8, 8, 3))
    return (write_h5(tmp_path / "train.h5", x, y, "train"), write_h5(tmp_path / "test.h5", xt, yt, "test"))


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides): the config exactly as the CLI composes it."""

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


def run_cli(*args: str, module: str = "pipeline", env: dict | None = None, check: bool = True, drop=()):
    """Run ``python -m <module> <args>`` from the project root, as a user would (without the
    variables ``drop`` names, before ``env`` is set)."""
    full_env = {k: v for k, v in os.environ.items() if k not in drop}
    full_env.update(env or {})
    full_env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def store(tmp_path):
    """A temporary MLflow store and output folder: the overrides that point a run at them."""
    db = tmp_path / "mlruns" / "mlflow.db"
    return {
        "uri": f"sqlite:///{db}",
        "out": tmp_path / "out",
        "args": [f"tracking.uri=sqlite:///{db}", f"paths.out_dir={tmp_path / 'out'}", "tracking.experiment=test"],
    }


def runs_of(uri: str, experiment: str = "test"):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client, ([] if exp is None else client.search_runs([exp.experiment_id]))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(autouse=True)
def _mlflow_uris_per_test():
    """Each test starts without the MLflow tracking and registry URIs an earlier test set in this
    process: store.client sets both, and MLflow keeps them in module globals and in environment
    variables that the CLI runs of later tests would inherit."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {name: os.environ.get(name) for name in names}
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root (CI), run its tools as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres():
    """A PostgreSQL cluster of Debian's postgresql package on a loopback port, with a database
    `mlflow` for user `catnet` (trust auth on loopback), stopped at the end."""
    import glob
    import shutil
    import tempfile

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        if os.environ.get("CI"):
            raise AssertionError("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bindir = Path(bins[-1]).parent
    home = Path(tempfile.mkdtemp(prefix="catnet-pg-"))  # not under pytest's root-only tmp: postgres reads it
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
    port = free_port()
    data = home / "data"
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "catnet"]),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(home / "log"), "-o",
                                 f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True)
    try:
        subprocess.run(_as_postgres([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "catnet",
                                     "mlflow"]), check=True, capture_output=True)
        yield f"postgresql://catnet@127.0.0.1:{port}/mlflow"
    finally:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 2)  # fast shutdown of the postmaster, by its process id: it ends open sessions
        for _ in range(120):
            if not (data / "postmaster.pid").exists():
                break
            time.sleep(0.5)
        shutil.rmtree(home, ignore_errors=True)


def slow_metric_inserts(uri: str, pad_rows: int) -> None:
    """Make the SQLite store at ``uri`` slow to take metric points (a trigger that counts a
    pad_rows x pad_rows cross join before each insert: a few ms a point), as a loaded disk is."""
    import sqlite3

    db = sqlite3.connect(uri[len("sqlite:///"):])
    db.execute("CREATE TABLE pad (x)")
    db.executemany("INSERT INTO pad VALUES (?)", [(i,) for i in range(pad_rows)])
    db.execute("CREATE TRIGGER slow_metrics BEFORE INSERT ON metrics WHEN (SELECT count(*) FROM pad a, pad b) < 0 "
               "BEGIN SELECT RAISE(ABORT, 'never'); END")
    db.commit()
    db.close()
