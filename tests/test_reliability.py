"""Nothing lost, nothing half-written: divergence, interruption, parallel writers, a remote
tracking server (up and down), reproducibility, data integrity, the malformed-input matrix."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REAL_TEST, REAL_TRAIN, free_port, needs_data, run_cli, runs_of
from test_data import EXPECTED, _bad_files

from catnet.errors import DataError
from pipeline.common import ROOT

pytestmark = needs_data


@pytest.mark.slow
def test_divergence_fails_the_run_at_that_epoch_and_publishes_nothing(store):
    proc = run_cli("train.lr=1e10", "train.epochs=500", *store["args"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "catnet: error: training diverged at epoch 21: the error stayed above 1.4 times its first value")
    client, runs = runs_of(store["uri"])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["catnet.diverged_epoch"] == "21"
    assert "TrainingDiverged" in runs[0].data.tags["catnet.failure"]
    assert len(client.get_metric_history(runs[0].info.run_id, "train/error")) == 20  # epochs completed
    assert not (store["out"] / "models/weights.npz").exists()
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"config.yaml"}


def _points_in(db: Path, key: str) -> int:
    """How many points of metric ``key`` a SQLite store holds (0 while its tables are being made)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute("SELECT count(*) FROM metrics WHERE key = ?", (key,)).fetchone()[0]
    except sqlite3.OperationalError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interruption_marks_the_run_killed_with_the_epochs_so_far(store, sig, code):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # SIGINT as a terminal's Ctrl-C delivers it: a shell that runs the tests in the background
    # (cmd &) has the children ignore SIGINT, and Python then rightly never sees it
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train.epochs=1000000", "tracking.flush_seconds=0.2",
                             "tracking.max_epoch_points=null",
                             *store["args"]], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    client = None
    try:
        db = Path(store["uri"].removeprefix("sqlite:///"))
        for _ in range(300):  # wait until some epochs have reached the store, read without MLflow (which
            time.sleep(0.2)   # would make the store's tables itself while the run's process makes them)
            if db.exists() and proc.poll() is None and _points_in(db, "train/error"):
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("catnet: interrupted by")
    client, runs = runs_of(store["uri"])
    assert runs[0].info.status == "KILLED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/error")]
    assert steps and sorted(steps) == list(range(1, len(steps) + 1))
    assert not (store["out"] / "models/weights.npz").exists()
    assert not list((store["out"]).rglob("*.tmp*"))


@pytest.mark.slow
def test_parallel_sweeps_on_one_sqlite_store_lose_nothing(tmp_path):
    """Three times the same 8 jobs, 2 at a time, into one store: all 24 trained and recorded.
    sweep.reuse=false: in a clean checkout (CI) the repeats would otherwise reuse the first."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for repeat in range(3):
        proc = run_cli("-m", "seed=0,1,2,3,4,5,6,7", "train.epochs=25", "train.check_learned=false", f"tracking.uri={uri}",
                       "sweep.reuse=false",
                       "tracking.experiment=test", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                       f"hydra.sweep.dir={tmp_path / f'multirun{repeat}'}")
        assert "database is locked" not in proc.stderr
    client, runs = runs_of(uri)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    unfinished = [(r.info.run_name, r.info.status, r.data.tags.get("catnet.failure")) for r in children
                  if r.info.status != "FINISHED"]
    assert len(children) == 24 and not unfinished, (unfinished, (proc.stdout + proc.stderr)[-4000:])
    for r in children:
        assert len(client.get_metric_history(r.info.run_id, "train/error")) == 25


@pytest.mark.slow
def test_remote_tracking_server_records_the_same_run(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "served"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib_ok(f"{uri}/health")
                break
            except OSError:
                time.sleep(0.5)
        run_cli("train.epochs=15", "train.check_learned=false", f"tracking.uri={uri}", "tracking.experiment=test",
                f"paths.out_dir={tmp_path / 'out'}")
        client, runs = runs_of(uri)
        assert [r.info.status for r in runs] == ["FINISHED"]
        rid = runs[0].info.run_id
        assert len(client.get_metric_history(rid, "train/error")) == 15
        assert runs[0].info.artifact_uri.startswith("mlflow-artifacts:")
        local = client.download_artifacts(rid, "weights.npz", str(tmp_path))
        with np.load(local, allow_pickle=False) as w, np.load(tmp_path / "out/models/weights.npz") as mine:
            assert all(np.array_equal(w[k], mine[k]) for k in mine)
        # the model, in the run's experiment, registered and used through the server as on SQLite
        exp = client.get_experiment_by_name("test")
        assert [m.source_run_id for m in client.search_logged_models([exp.experiment_id])] == [rid]
        reg = run_cli(f"tracking.uri={uri}", "experiment=test", module="pipeline.register")
        assert f"run {rid}" in reg.stdout
        from PIL import Image

        with h5py.File(REAL_TEST) as f:
            Image.fromarray(f["test_set_x"][0]).save(tmp_path / "a.png")
        for model_uri in (f"runs:/{rid}/model", "models:/catnet@champion"):
            pred = run_cli(f"model_uri={model_uri}", f"images=[{tmp_path / 'a.png'}]", f"tracking.uri={uri}",
                           module="pipeline.predict")
            assert pred.stdout.strip().splitlines()[-1].startswith(str(tmp_path / "a.png"))
    finally:
        server.terminate()
        server.wait(timeout=30)


def urllib_ok(url: str) -> None:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5):
        pass


def test_a_tracking_server_that_is_not_there_fails_fast(store):
    start = time.monotonic()
    proc = run_cli("train.epochs=5", "train.check_learned=false", f"tracking.uri=http://127.0.0.1:{free_port()}",
                   f"paths.out_dir={store['out']}", check=False)
    assert time.monotonic() - start < 30
    assert proc.returncode == 2 and "no MLflow server answers there" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (store["out"] / "models/weights.npz").exists()


def test_an_outage_is_told_from_other_store_errors():
    """What a killed server raises in the client, before or in the middle of an answer, is an
    outage (the job's reason says the server did not answer); a store's own refusal is not."""
    import requests
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.store import unreachable

    def raised(error, cause):
        error.__cause__ = cause
        return error

    assert unreachable(raised(MlflowException("API request failed"), requests.exceptions.ConnectionError("refused")))
    assert unreachable(raised(MlflowException("API request failed"), requests.exceptions.ChunkedEncodingError("x")))
    assert unreachable(MlflowException("API request to /runs/log-inputs failed with exception ('Connection broken: "
                                       "IncompleteRead(0 bytes read, 2 more expected)', ...)"))
    assert not unreachable(MlflowException("Run 'abc' not found"))
    assert not unreachable(ValueError("Connection string"))


class _Server:
    """A loopback HTTP server whose /health answers 200 while ``up``, and an MLflow-like request
    that, like MLflow's client, fails with a ConnectionError while it is down."""

    def __init__(self, up_after: int | None):
        import http.server
        import threading

        self.up_after, self.health_asked, self.attempts = up_after, 0, 0
        outer = self

        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                outer.health_asked += 1
                up = outer.up_after is not None and outer.health_asked > outer.up_after
                self.send_response(200 if up else 503)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Health)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def request(self, error=None):
        import requests

        self.attempts += 1
        up = self.up_after is not None and self.health_asked > self.up_after
        if error is not None:
            raise error
        if not up:
            raise requests.exceptions.ConnectionError("Max retries exceeded with url: /api (Connection refused)")
        return "written"


def test_a_request_waits_for_the_server_until_retry_seconds_since_it_stopped_answering():
    """tracking.retry_seconds is one rule for every request (outage.patiently): a request that
    cannot reach the server is asked again once the server answers its health check, however
    long that takes within the seconds; past them, the request's own error; any other error at
    once. Counted, not timed."""
    from pipeline.tracking.outage import patiently

    back = _Server(up_after=3)  # the health check answers at its 4th asking (about 3 s)
    assert patiently(back.uri, 60, back.request) == "written"
    assert back.attempts == 2 and back.health_asked == 4
    gone = _Server(up_after=None)
    import requests

    with pytest.raises(requests.exceptions.ConnectionError):
        patiently(gone.uri, 2, gone.request)
    assert gone.attempts == 2 and gone.health_asked >= 2  # asked until the seconds ran out, then once more
    other = _Server(up_after=0)
    with pytest.raises(ValueError):
        patiently(other.uri, 60, other.request, ValueError("a bad value"))
    assert other.attempts == 1 and other.health_asked == 0
    for server in (back, gone, other):
        server.httpd.shutdown()


def test_mlflow_s_own_retries_are_off_so_that_one_rule_waits():
    """A server that hangs up on every request sees exactly one attempt of an MLflow request (its
    own default is 7 retries over about 4 minutes): the waiting is catnet's (outage.patiently)."""
    import socket
    import threading

    attempts = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def hang_up():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            attempts.append(1)
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    code = f"""
from mlflow import MlflowClient
from pipeline.tracking import store
store.bound_retries()
try:
    MlflowClient(tracking_uri="http://127.0.0.1:{server.getsockname()[1]}").get_experiment("0")
except Exception as e:
    print(type(e).__name__, store.unreachable(e))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    finally:
        server.close()
    assert proc.stdout.strip() == "MlflowException True", proc.stderr[-2000:]
    assert len(attempts) == 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_config_and_seed_give_bit_identical_weights(tmp_path, dtype):
    arrays = []
    for name in ("a", "b"):
        run_cli("train.epochs=15", "train.check_learned=false", f"train.dtype={dtype}", "seed=7", "tracking.enabled=false",
                f"paths.out_dir={tmp_path / name}")
        with np.load(tmp_path / name / "models/weights.npz", allow_pickle=False) as f:
            arrays.append({k: f[k] for k in f})
    assert arrays[0].keys() == arrays[1].keys()
    assert all(arrays[0][k].tobytes() == arrays[1][k].tobytes() for k in arrays[0])
    assert all(arrays[0][k].dtype == dtype for k in arrays[0] if k.startswith("W"))


def test_altered_data_is_refused_before_training(tmp_path):
    from pipeline.load import verify_dvc_tracked

    raw = tmp_path / "raw"
    raw.mkdir()
    for f in (REAL_TRAIN, REAL_TEST):
        shutil.copy(f, raw / f.name)
    shutil.copy(ROOT / "data/raw.dvc", tmp_path / "raw.dvc")
    verify_dvc_tracked(raw / REAL_TRAIN.name)  # as pulled: fine
    with open(raw / REAL_TEST.name, "r+b") as f:
        f.seek(5000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(DataError, match=r"does not match raw.dvc .*dvc checkout raw.dvc"):
        verify_dvc_tracked(raw / REAL_TRAIN.name)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_malformed_file_through_the_cli(tmp_path, store, case):
    bad = _bad_files(tmp_path)[case]
    proc = run_cli(f"data.train_path={bad}", *store["args"], check=False)
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"catnet: error: data.train_path={bad}")
    assert EXPECTED[case] in lines[0]
    assert not store["out"].exists()  # no stage output at all
    _, runs = runs_of(store["uri"])
    assert runs == []


@pytest.mark.parametrize("override", [
    "train.lr=abc", "train.lr=0", "train.epochs=-3", "train.epochs=ten", "model.hidden_sizes=[]",
    "model.hidden_sizes=abc", "model.activation=swish", "model.bias=perhaps", "model.init=zeros",
    "train.dtype=int8", "train.loss=mae", "seed=-1", "data.val_fraction=1.5", "data.image_shape=[0,64,3]",
    "normalize.divisor=0", "train.divergence_ratio=0.5", "tracking.uri=ftp://x", "tracking.flush_seconds=-1",
    "tracking.retry_seconds=-1", "tracking.retry_seconds=inf",
])
def test_bad_knob_through_the_cli(store, override):
    proc = run_cli(*store["args"], override, check=False)
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("catnet: error: " + override.split("=")[0]), lines
    assert not (store["out"] / "models").exists()


@pytest.mark.parametrize("module, override, expected", [
    ("pipeline", "train.lrr=1", "Could not override 'train.lrr'; Key 'lrr' is not in struct; "
                                "To append to your config use +train.lrr=1"),
    ("pipeline", "model=nope", "Could not find 'model/nope'; Available options in 'model': deep, seed"),
    ("pipeline", "train.lr=[", "no viable alternative at input '['"),
    ("pipeline", "hydra/launcher=nope", "Available options in 'hydra/launcher': basic, joblib"),
    ("pipeline.train", "train.lrr=1", "Could not override 'train.lrr'"),
    ("pipeline.compare", "bogus=1", "Could not override 'bogus'; Key 'bogus' not in 'CompareConfig'"),
])
def test_bad_override_is_one_line_from_hydra_too(store, module, override, expected):
    """Hydra refuses these before any stage runs; its several-line report becomes one line,
    exit status 2, like a bad value. HYDRA_FULL_ERROR=1 still shows Hydra's full report."""
    args = [] if module == "pipeline.compare" else store["args"]  # compare has no tracking/paths keys
    proc = run_cli(*args, override, module=module, check=False)
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("catnet: error: ") and expected in lines[0], lines
    assert not store["out"].exists()
    if override == "train.lrr=1" and module == "pipeline":
        full = subprocess.run([sys.executable, "-m", module, *store["args"], override], cwd=ROOT,
                              env={**os.environ, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True)
        assert full.returncode == 1 and "Traceback" in full.stderr and "ConfigCompositionException" in full.stderr


@pytest.mark.parametrize("experiment", ["made", "never-made"])
def test_compare_with_nothing_to_compare_says_which_store_it_looked_in(tmp_path, experiment):
    """A user who swept into a team's server and runs compare without ``tracking.uri`` is told
    which store it read (the local one) and how to name another, in one line."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, _ = runs_of(uri)
    client.create_experiment("made")
    proc = run_cli(f"tracking.uri={uri}", f"experiment={experiment}", f"out_dir={tmp_path / 'compare'}",
                   module="pipeline.compare", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-1500:]
    assert str(tmp_path / "mlflow.db") in lines[0] and "tracking.uri=http://<server>:5000" in lines[0], lines
    assert ("no finished runs" if experiment == "made" else "no such MLflow experiment") in lines[0]
