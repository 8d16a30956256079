"""Sweeps on a real Ray cluster (`ray start --head`, started and stopped here by process id)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, import_or_skip, needs_data, run_cli, runs_of

pytestmark = [needs_data, pytest.mark.xdist_group("cluster")]  # one worker: one Ray head, one PostgreSQL at a time


def wait_until_up(answers, proc: subprocess.Popen, log: Path, what: str, seconds: float = 120) -> None:
    """Until ``answers()``; fail with the log's tail if ``proc`` ends or ``seconds`` pass."""
    deadline = time.time() + seconds
    while not answers():
        assert proc.poll() is None, f"{what} ended:\n" + log.read_text()[-3000:]
        assert time.time() < deadline, f"{what} did not answer in {seconds:.0f} s:\n" + log.read_text()[-3000:]
        time.sleep(0.5)


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on this machine, as a team starts one (`ray start --head`), in the foreground
    (--block) so that its process id stops it and everything it started."""
    import_or_skip("ray", reason="the cluster extra is not installed (make setup-cluster)")
    ray = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray), "start", "--head", "--block", "--port=0", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=open(tmp_path / "ray.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def answers() -> bool:
            try:
                return subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto'); ray.shutdown()"],
                                      capture_output=True, timeout=60).returncode == 0
            except subprocess.TimeoutExpired:  # a head still starting can keep a client waiting
                return False

        wait_until_up(answers, proc, tmp_path / "ray.log", "the Ray head")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.mark.slow
def test_a_sweep_on_an_existing_ray_cluster_keeps_its_structure_and_outputs(ray_head, tmp_path):
    """hydra/launcher=ray_cluster: the jobs run on the cluster's workers (which do not inherit the
    driver's environment), stay children of the sweep's parent, are counted, and write their
    outputs under the sweep folder the command named (relative to where it ran)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "-m", "seed=0,1", "hydra/launcher=ray_cluster",
                           "train.epochs=20", "train.check_learned=false", f"tracking.uri={uri}",
                           "tracking.experiment=test", "hydra.sweep.dir=sweeps/cluster"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "sweep: 2 jobs, 2 finished, 0 failed" in log
    client, runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags.get("catnet.sweep") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.params["sweep.launcher"] == "RayClusterLauncher"
    assert sorted(c.info.run_name for c in children) == ["#0 seed=0", "#1 seed=1"]
    assert all(c.info.status == "FINISHED" for c in children) and len(runs) == 3
    assert all(len(client.get_metric_history(c.info.run_id, "train/error")) == 20 for c in children)
    for job in ("0", "1"):
        assert (tmp_path / "sweeps/cluster" / job / "models/weights.npz").is_file()
    # ray_local keeps starting a private instance while a cluster runs on the machine
    local = run_cli("-m", "seed=0,1", "hydra/launcher=ray_local", "train.epochs=5", "train.check_learned=false",
                    f"tracking.uri={uri}", "tracking.experiment=local", f"hydra.sweep.dir={tmp_path / 'local'}")
    assert "sweep: 2 jobs, 2 finished, 0 failed" in local.stdout + local.stderr


class MlflowServer:
    """`mlflow server` on PostgreSQL with served artifacts, bound to 127.0.0.1 (README: Team mode),
    on one port for its life: ``kill`` stops it (SIGKILL, an outage), ``start`` brings it back."""

    def __init__(self, backend: str, folder: Path):
        self.backend, self.folder, self.port = backend, folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def answers(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                return True
        except OSError:
            return False

    def start(self) -> None:
        log = self.folder / "server.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                                      "--artifacts-destination", str(self.folder / "served"), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--workers", "1"], cwd=self.folder,
                                     start_new_session=True, stdout=open(log, "a"), stderr=subprocess.STDOUT)
        wait_until_up(self.answers, self.proc, log, "mlflow server")

    def kill(self, signal: int = 9) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal)
            self.proc.wait(timeout=60)


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    import_or_skip("psycopg", reason="the cluster extra is not installed (make setup-cluster)")
    server = MlflowServer(postgres, tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.kill(15)


def _whole_sweep(uri: str, epochs: int):
    """The store holds one FINISHED parent and its 4 FINISHED children, each with every epoch's
    train/error, weights.npz and its model; returns the parent."""
    client, runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags.get("catnet.sweep") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 4 and len(runs) == 5
    for child in children:
        assert child.info.status == "FINISHED"
        assert len(client.get_metric_history(child.info.run_id, "train/error")) == epochs
        assert "weights.npz" in {a.path for a in client.list_artifacts(child.info.run_id)}
        assert child.data.tags["catnet.model_uri"].startswith("models:/m-")
        assert [o.model_id for o in child.outputs.model_outputs] == [child.data.tags["catnet.model_uri"][8:]]
    return parent


@pytest.mark.slow
def test_team_mode_a_sweep_on_the_cluster_recorded_by_a_server_on_postgresql(ray_head, mlflow_server, tmp_path):
    """The README's Team mode, on real engines: 4 jobs through hydra/launcher=ray_cluster to an
    mlflow server on PostgreSQL; one parent, 4 FINISHED children with every epoch, weights.npz and
    a model; register and predict through the server."""
    uri = mlflow_server.uri
    proc = run_cli("-m", "seed=0,1,2,3", "hydra/launcher=ray_cluster", "train.epochs=20", "train.check_learned=false",
                   f"tracking.uri={uri}", "tracking.experiment=test", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert "sweep: 4 jobs, 4 finished, 0 failed" in proc.stdout + proc.stderr
    parent = _whole_sweep(uri, epochs=20)
    reg = run_cli(f"tracking.uri={uri}", "experiment=test", module="pipeline.register")
    best = parent.data.tags["catnet.best_run_id"]
    assert f"run {best}" in reg.stdout
    import h5py
    from conftest import REAL_TEST
    from PIL import Image

    with h5py.File(REAL_TEST) as f:
        Image.fromarray(f["test_set_x"][0]).save(tmp_path / "a.png")
    pred = run_cli("model_uri=models:/catnet@champion", f"images=[{tmp_path / 'a.png'}]", f"tracking.uri={uri}",
                   module="pipeline.predict")
    assert pred.stdout.strip().splitlines()[-1].startswith(str(tmp_path / "a.png"))


def _sweep_in_background(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """`python -m pipeline -m <args>` from the project root, its output in a file to watch."""
    from conftest import ROOT

    out = tmp_path / "sweep.log"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-m", *args], cwd=ROOT, env=env,
                            stdout=open(out, "w"), stderr=subprocess.STDOUT, text=True)
    return proc, out


def _when_logged(text: str, proc: subprocess.Popen, out: Path, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while text not in out.read_text():
        assert proc.poll() is None and time.time() < deadline, f"never logged {text!r}:\n" + out.read_text()[-3000:]
        time.sleep(0.05)


OUTAGE_SWEEP = ("seed=0,1,2,3", "train.epochs=2000", "train.check_learned=false", "tracking.flush_seconds=1",
                "tracking.experiment=test")


@pytest.mark.slow
def test_a_server_gone_for_good_fails_the_sweep_and_names_what_it_could_not_record(mlflow_server, tmp_path):
    """The server is killed while job #1 runs and stays down: the sweep exits 1, counts the jobs,
    and names the runs left RUNNING and the jobs left without a run; once the server is back,
    the next catnet command closes those runs (their processes ended): nothing stays RUNNING."""
    server = mlflow_server
    proc, out = _sweep_in_background(tmp_path, *OUTAGE_SWEEP, f"tracking.uri={server.uri}",
                                     "tracking.retry_seconds=3", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    _when_logged("'#1 seed=1' in experiment", proc, out)
    server.kill()
    assert proc.wait(timeout=300) == 1
    log = out.read_text()
    assert "sweep: 4 jobs, 1 finished, 3 failed" in log, log[-3000:]
    error = next(line for line in log.splitlines() if line.startswith("catnet: error: sweep:"))
    assert "3 of 4 jobs failed; tracking.uri=" in error and "no MLflow server answers there" in error
    assert "; not in the tracking store: the sweep's parent run " in error
    assert "job '#2 seed=2' has no run" in error and "job '#3 seed=3' has no run" in error
    # gone for good: at most one job waits tracking.retry_seconds for it; once one gave up, the
    # next ones ask once (counted in the jobs' reasons, not timed)
    lines = [line for line in log.splitlines()  # the jobs' own lines, not the sweep's summary
             if "no MLflow server answers there" in line and not line.startswith("catnet: error: sweep:")]
    assert sum("answers there for 3 s" in line for line in lines) <= 1, lines
    assert sum("answers there (" in line for line in lines) >= 2, lines  # jobs #2 and #3 asked once
    server.start()
    client, runs = runs_of(server.uri)
    running = {r.info.run_id for r in runs if r.info.status == "RUNNING"}
    parent = next(r for r in runs if r.data.tags.get("catnet.sweep") == "parent")
    assert parent.info.run_id in running and len(running) == 2  # the parent and job #1's run
    assert all(f"run {run_id} left RUNNING" in error for run_id in running), error
    assert [r.info.status for r in runs if r.info.run_name == "#0 seed=0"] == ["FINISHED"]
    run_cli(f"tracking.uri={server.uri}", "experiment=test", f"out_dir={tmp_path / 'compare'}",
            module="pipeline.compare")
    _, runs = runs_of(server.uri)
    assert {r.info.status for r in runs if r.info.run_id in running} == {"KILLED"}


@pytest.mark.slow
def test_a_server_back_before_the_sweep_ends_gets_every_failed_job_as_a_failed_run(mlflow_server, tmp_path):
    """The server is killed while job #1 runs, and is back only after the last job gave up: the
    sweep's end waits for it (tracking.retry_seconds) and records what the jobs could not: job
    #1's run FAILED, a FAILED run for each job that never had one, the parent FAILED; exit 1."""
    server = mlflow_server
    proc, out = _sweep_in_background(tmp_path, *OUTAGE_SWEEP, f"tracking.uri={server.uri}",
                                     "tracking.retry_seconds=30", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    _when_logged("'#1 seed=1' in experiment", proc, out)
    server.kill()
    _when_logged("#3 : seed=3", proc, out)
    server.start()
    assert proc.wait(timeout=300) == 1, out.read_text()[-3000:]
    log = out.read_text()
    assert "sweep: 4 jobs, 1 finished, 3 failed" in log
    assert "not in the tracking store" not in log, log[-3000:]
    _, runs = runs_of(server.uri)
    status = {r.info.run_name: r.info.status for r in runs}
    parent = next(r for r in runs if r.data.tags.get("catnet.sweep") == "parent")
    assert status == {parent.info.run_name: "FAILED", "#0 seed=0": "FINISHED", "#1 seed=1": "FAILED",
                      "#2 seed=2": "FAILED", "#3 seed=3": "FAILED"}, status
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4
    for child in (c for c in children if c.info.status == "FAILED"):
        assert "did not answer" in child.data.tags["catnet.failure"] or "no MLflow server" in child.data.tags["catnet.failure"]
    late = next(r for r in runs if r.info.run_name == "#3 seed=3")
    assert late.data.params["seed"] == "3" and "recorded by the sweep" in late.data.tags["catnet.failure"]


@pytest.mark.slow
def test_two_outages_shorter_than_retry_seconds_lose_nothing(mlflow_server, tmp_path):
    """The server (every process of it) is killed twice during one sweep and restarted on its port
    20 s later each time, with the default tracking.retry_seconds (60): every request of every job
    (points while training, artifacts, the model, the status) waits it out, every job ends
    FINISHED with each epoch, its weights and its model, and the sweep exits 0."""
    server = mlflow_server
    epochs = 1500
    proc, out = _sweep_in_background(tmp_path, "seed=0,1,2,3", f"train.epochs={epochs}", "train.solver=primal",
                                     "train.check_learned=false", "tracking.flush_seconds=1", "tracking.experiment=test",
                                     f"tracking.uri={server.uri}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    downs = []
    for job in ("'#1 seed=1' in experiment", "'#3 seed=3' in experiment"):
        _when_logged(job, proc, out)
        time.sleep(1)  # into its training: its points, then its files and model, meet the outage
        server.kill()
        down = time.monotonic()
        time.sleep(20)
        server.start()
        downs.append(time.monotonic() - down)
    assert proc.wait(timeout=600) == 0, out.read_text()[-3000:]
    log = out.read_text()
    assert "sweep: 4 jobs, 4 finished, 0 failed" in log and log.count("does not answer") >= 2, log[-3000:]
    parent = _whole_sweep(server.uri, epochs=epochs)
    client, runs = runs_of(server.uri)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert all(r.data.tags.get("catnet.model_uri", "").startswith("models:/") for r in children)
    print(f"outages of {downs[0]:.0f} s and {downs[1]:.0f} s: 4 of 4 jobs FINISHED")


@pytest.mark.slow
def test_a_job_whose_server_stays_away_keeps_its_weights_and_says_where(mlflow_server, tmp_path):
    """A server gone longer than tracking.retry_seconds while a job trains: the job fails when
    its files cannot be logged, and its trained weights are on disk in its own folder, named in
    its reason."""
    server = mlflow_server
    proc, out = _sweep_in_background(tmp_path, "seed=0", "train.epochs=1500", "train.solver=primal",
                                     "train.check_learned=false", "tracking.flush_seconds=1", "tracking.experiment=test",
                                     "tracking.retry_seconds=5", f"tracking.uri={server.uri}",
                                     f"hydra.sweep.dir={tmp_path / 'sweep'}")
    _when_logged("in experiment 'test'", proc, out)
    time.sleep(1)  # into its training
    server.kill()
    assert proc.wait(timeout=300) == 1
    log = out.read_text()
    weights = tmp_path / "sweep" / "0" / "models" / "weights.npz"
    assert weights.exists() and f"its trained weights are kept in {weights}" in log, log[-3000:]
    with np.load(weights, allow_pickle=False) as f:
        assert f["W1"].shape == (12288, 20)


@pytest.mark.slow
def test_an_optuna_search_on_the_cluster_keeps_its_study_in_the_teams_postgresql(ray_head, mlflow_server, tmp_path):
    """hparams_search=optuna on hydra/launcher=ray_cluster, its study in a PostgreSQL database beside
    the mlflow server's: the trials (two at a time on the cluster's workers) report to the study
    from there, each trial one child run tagged with its number, and the same command again
    continues the study."""
    import psycopg

    with psycopg.connect(mlflow_server.backend, autocommit=True) as db:
        db.execute("CREATE DATABASE optuna")
    storage = mlflow_server.backend.rsplit("/", 1)[0] + "/optuna"
    args = ("-m", "hparams_search=optuna", "hydra/launcher=ray_cluster", f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_startup_trials=1", "hydra.sweeper.n_warmup_steps=1",
            "train.epochs=100", "train.check_learned=false", "data.cv_folds=2", "data.cv_repeats=1",
            f"tracking.uri={mlflow_server.uri}", "tracking.experiment=test")
    first = run_cli(*args, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert "sweep: 3 jobs, " in first.stdout + first.stderr
    more = run_cli(*args, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={tmp_path / 'more'}")
    log = more.stdout + more.stderr
    assert "3 trials ended, 1 to run (n_trials=4)" in log and "sweep: 1 jobs, " in log, log[-3000:]
    import optuna

    study = optuna.load_study(study_name="catnet", storage=storage)
    assert len(study.trials) == 4 and all(t.state.is_finished() for t in study.trials)
    reported = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]  # a diverged one may not
    assert reported and all(t.intermediate_values for t in reported)  # reported from the cluster's workers
    _, runs = runs_of(mlflow_server.uri)
    children = [r for r in runs if "optuna.trial" in r.data.tags]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [0, 1, 2, 3]
    parents = [r for r in runs if r.data.tags.get("catnet.sweep") == "parent"]
    assert {p.data.params["sweep.storage"] for p in parents} == {storage}


def _env_file(path: Path) -> dict[str, str]:
    """The variables an ``export K=V`` file sets."""
    return dict(line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines()
                if line.startswith("export "))


def _answers(uri: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2):
            return True
    except OSError:
        return False


def _nobody_is_let_in(folder: Path, ports: dict[str, int]) -> None:
    """make team-up's stack asks everyone for credentials: anonymous MLflow requests get 401
    (a write, a read, the UI), PostgreSQL refuses a login without the password (also from another
    Unix user), and the role catnet, with its password, is no superuser (no COPY ... FROM PROGRAM)."""
    import base64
    import glob
    import json
    import urllib.error
    import urllib.request

    uri = f"http://127.0.0.1:{ports['mlflow']}"
    for path, body in (("/api/2.0/mlflow/experiments/create", b'{"name": "intruder"}'),
                       ("/api/2.0/mlflow/experiments/search?max_results=5", None), ("/", None)):
        request = urllib.request.Request(uri + path, data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401, path
    secret = json.loads((folder / "secrets.json").read_text())["mlflow"]
    login = urllib.request.Request(uri + "/api/2.0/mlflow/experiments/search?max_results=5")
    login.add_header("Authorization", "Basic " + base64.b64encode(f"admin:{secret}".encode()).decode())
    with urllib.request.urlopen(login, timeout=10) as answer:
        assert answer.status == 200
    bare = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "PGPASS"))}
    for login in ({}, {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "a guess"}):
        refused = run_cli("-m", "seed=0,1", f"tracking.uri={uri}", "train.epochs=5", env=login, check=False,
                          drop=("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2 and len(lines) == 1 and "the server asks for a login, which " in lines[0], lines
    psql = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))[-1]
    attack = "create temp table t(x text); copy t from program 'id'; select x from t"
    for user in ("catnet", "postgres"):
        for prefix in ([], ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []):
            cmd = [*prefix, str(psql), "-h", "127.0.0.1", "-p", str(ports["pg"]), "-U", user, "-w", "-d", "postgres",
                   "-c", attack]
            out = subprocess.run(cmd, env={**bare, "HOME": "/nonexistent"}, capture_output=True, text=True)
            assert out.returncode != 0 and "no password supplied" in out.stderr, (cmd, out.stdout, out.stderr)
    own = subprocess.run([str(psql), "-h", "127.0.0.1", "-p", str(ports["pg"]), "-U", "catnet", "-w", "-d", "mlflow",
                          "-tAc", "select rolsuper from pg_roles where rolname = current_user"],
                         env={**bare, "PGPASSFILE": str(folder / "pgpass")}, capture_output=True, text=True)
    assert own.stdout.strip() == "f", own.stderr
    copy = subprocess.run([str(psql), "-h", "127.0.0.1", "-p", str(ports["pg"]), "-U", "catnet", "-w", "-d", "mlflow",
                           "-c", attack], env={**bare, "PGPASSFILE": str(folder / "pgpass")}, capture_output=True,
                          text=True)
    assert copy.returncode != 0 and "pg_execute_server_program" in copy.stderr, copy.stderr


def _session_members(leaders: list[int]) -> dict[int, int]:
    """{pid: session} of the live processes in the sessions of ``leaders``."""
    import psutil

    out = {}
    for p in psutil.process_iter():
        try:
            sid = os.getsid(p.pid)
        except (ProcessLookupError, PermissionError):
            continue
        if sid in leaders:
            out[p.pid] = sid
    return out


@pytest.mark.slow
def test_make_team_up_starts_a_loopback_stack_that_a_sweep_uses_and_team_down_stops_exactly_it(ray_head, tmp_path):
    """make team-up: PostgreSQL, an mlflow server on it and a Ray head, every port on loopback, each
    asking for credentials (anonymous and password-less access refused, secrets mode 600, Ray's
    session in a private folder); a ray_cluster sweep and an Optuna search through it after `source
    team/env`; a second team-up changes nothing; after the server is restarted with `team restart`
    and then by hand, make team-down stops its processes by id and the hand-started server, nothing
    listens on the stack's ports, and another Ray head on this machine (the fixture's) keeps running."""
    import glob
    import json
    import shutil
    import tempfile

    import psutil

    import_or_skip("psycopg", reason="the cluster extra is not installed (make setup-cluster)")
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        if os.environ.get("CI"):
            raise AssertionError("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    from pipeline.common import ROOT

    folder = Path(tempfile.mkdtemp(prefix="catnet-team-"))  # not pytest's root-only tmp: postgres writes in it
    folder.chmod(0o755)  # as a project's team/ is
    ports = {name: free_port() for name in ("pg", "mlflow", "ray", "ray-client", "dashboard")}
    args = f"--dir {folder} " + " ".join(f"--{name}-port {port}" for name, port in ports.items())
    make = ["make", "--no-print-directory", "-C", str(ROOT)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    other_ray = _session_members([ray_head.pid])
    try:
        up = subprocess.run([*make, "team-up", f"TEAM_ARGS={args}"], env=env, capture_output=True, text=True,
                            timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert f"tracking.uri=http://127.0.0.1:{ports['mlflow']}" in up.stdout
        assert f"Ray address: 127.0.0.1:{ports['ray']}, token authentication on" in up.stdout
        assert "listening beyond loopback: nothing (every port on 127.0.0.1)" in up.stdout
        state = json.loads((folder / "stack.json").read_text())
        leaders = [s["pid"] for s in state["services"]]
        assert [s["name"] for s in state["services"]] == ["postgresql", "mlflow server", "ray head"]
        members = _session_members(leaders) | {pid: pid for pid in leaders}
        listening = [(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in members]
        assert {p for _, p in listening} >= {ports["pg"], ports["mlflow"], ports["ray"], ports["dashboard"]}
        assert all(ip.removeprefix("::ffff:").startswith("127.") for ip, _ in listening), listening
        _nobody_is_let_in(folder, ports)
        for secret in ("ray_token", "secrets.json", "pgpass", "mlflow_auth.ini", "env", "mlflow_auth.db"):
            assert oct((folder / secret).stat().st_mode & 0o777) == "0o600", secret
        ray_private = Path(next(s for s in state["services"] if s["name"] == "ray head")["temp_dir"])
        assert oct(ray_private.stat().st_mode & 0o777) == "0o700" and ray_private.owner() == Path.home().owner()

        # a sweep and an Optuna search as the README says: source the env file, then the
        # ray_cluster launcher, into the server, the study in the stack's PostgreSQL
        mlflow_uri = f"http://127.0.0.1:{ports['mlflow']}"
        storage = f"postgresql://catnet@127.0.0.1:{ports['pg']}/optuna"
        for command, done in ((f"seed=0,1 train.epochs=20 hydra.sweep.dir={tmp_path / 'sweep'}",
                               "sweep: 2 jobs, 2 finished, 0 failed"),
                              (f"hparams_search=optuna hydra.sweeper.storage={storage} hydra.sweeper.n_trials=2 "
                               f"hydra.sweeper.n_jobs=2 train.epochs=20 data.cv_folds=2 "
                               f"hydra.sweep.dir={tmp_path / 'search'}", "sweep: 2 jobs, ")):
            sweep = subprocess.run(["bash", "-c", f"source {folder / 'env'} && exec {sys.executable} -m pipeline -m "
                                    f"hydra/launcher=ray_cluster train.check_learned=false tracking.uri={mlflow_uri} "
                                    f"tracking.experiment=test {command}"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=600)
            assert sweep.returncode == 0 and done in sweep.stdout + sweep.stderr, sweep.stderr[-3000:]
        credentials = {**os.environ, **_env_file(folder / "env")}
        listed = subprocess.run([sys.executable, "-c", "import mlflow; print(len(mlflow.search_runs("
                                 "experiment_names=['test'], output_format='list')))"], env=credentials,
                                capture_output=True, text=True, check=True)
        assert int(listed.stdout) == 3 + 3  # each of the two sweeps: a parent and two children

        again = subprocess.run([*make, "team-up", f"TEAM_ARGS={args}"], env=env, capture_output=True, text=True,
                               timeout=600)
        assert again.returncode == 0 and "the stack is up already" in again.stdout
        assert [s["pid"] for s in json.loads((folder / "stack.json").read_text())["services"]] == leaders

        # the server restarted the documented way, then by hand (its whole group killed, another
        # started on its port): team-down stops that one too, and nothing of the stack listens after
        restart = subprocess.run([sys.executable, "-m", "pipeline.team", "restart", "mlflow", "--dir", str(folder)],
                                 capture_output=True, text=True, timeout=600)
        assert restart.returncode == 0 and "mlflow server restarted" in restart.stdout, restart.stderr[-2000:]
        leaders = [s["pid"] for s in json.loads((folder / "stack.json").read_text())["services"]]
        server = leaders[1]
        os.killpg(server, 9)
        by_hand = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                    f"sqlite:///{tmp_path / 'hand.db'}", "--host", "127.0.0.1", "--port",
                                    str(ports["mlflow"]), "--workers", "2"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        wait_until_up(lambda: _answers(mlflow_uri), by_hand, tmp_path / "none.log", "the server started by hand")
        members = _session_members(leaders) | {pid: pid for pid in leaders}
        down = subprocess.run([*make, "team-down", f"TEAM_ARGS=--dir {folder}"], env=env, capture_output=True,
                              text=True, timeout=600)
        assert down.returncode == 0, down.stderr[-3000:]
        assert down.stdout.count("team: stopped ") == 3 and "had ended already" in down.stdout, down.stdout
        assert f"which listened on port {ports['mlflow']}" in down.stdout
        assert by_hand.wait(timeout=60) is not None
        assert not [pid for pid in members if psutil.pid_exists(pid)
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not [c for c in psutil.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN and c.laddr.port in ports.values()]
        assert not ray_private.exists()
        assert not (folder / "stack.json").exists() and not (folder / "env").exists()
        assert ray_head.poll() is None and set(_session_members([ray_head.pid])) >= set(other_ray)
        again = subprocess.run([*make, "team-down", f"TEAM_ARGS=--dir {folder}"], env=env, capture_output=True,
                               text=True, timeout=600)
        assert again.returncode == 0 and "nothing to stop" in again.stdout
    finally:
        subprocess.run([sys.executable, "-m", "pipeline.team", "down", "--dir", str(folder)], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


class Slurm:
    """A one-node SLURM cluster of Debian's packages, in ``folder``, on loopback ports: munged (its
    own key and socket), MariaDB and slurmdbd (the accounting submitit reads job states from, with
    sacct), slurmctld and slurmd. Clients find it through ``env`` (SLURM_CONF)."""

    DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")

    def __init__(self, folder: Path):
        import shutil
        import socket

        missing = [d for d in (*self.DAEMONS, "mariadb-install-db", "sacct") if not shutil.which(d) and
                   not Path("/usr/sbin", d).exists()]
        if missing:
            if os.environ.get("CI"):
                raise AssertionError(f"SLURM is not installed ({missing}): .ci/run installs slurm-wlm, slurmdbd, "
                                     "munge and mariadb-server")
            pytest.skip(f"SLURM is not installed ({', '.join(missing)}): apt-get install slurm-wlm slurmdbd munge "
                        "mariadb-server")
        self.folder, self.node = folder, socket.gethostname().split(".")[0]
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}

    def _start(self, name: str, cmd: list[str], answers) -> None:
        log = self.folder / f"{name}.out"
        proc = subprocess.Popen(cmd, cwd=self.folder, env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        wait_until_up(answers, proc, log, name, seconds=60)

    def _ok(self, *cmd: str) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True).returncode == 0

    def start(self) -> None:
        f = self.folder
        db_port, dbd_port, ctld_port, slurmd_port = (free_port() for _ in range(4))
        (f / "munge.key").write_bytes(os.urandom(1024))
        (f / "munge.key").chmod(0o400)
        munge = ["--socket", str(f / "munge.sock")]
        self._start("munged", ["munged", "-F", *munge, "--key-file", str(f / "munge.key"), "--pid-file",
                               str(f / "munged.pid"), "--log-file", str(f / "munged.log"), "--seed-file",
                               str(f / "munged.seed")], lambda: (f / "munge.sock").exists())
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={f / 'db'}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"], check=True, capture_output=True)
        sock = f / "db.sock"
        self._start("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={f / 'db'}", f"--socket={sock}",
                                 f"--port={db_port}", "--bind-address=127.0.0.1", "--user=root",
                                 f"--pid-file={f / 'db.pid'}", "--skip-name-resolve"],
                    lambda: self._ok("mariadb", "--no-defaults", "-S", str(sock), "-uroot", "-e", "select 1"))
        subprocess.run(["mariadb", "--no-defaults", "-S", str(sock), "-uroot", "-e",
                        "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'catnet'; "
                        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"], check=True)
        auth = f"AuthType=auth/munge\nAuthInfo=socket={f / 'munge.sock'}\n"
        (f / "slurmdbd.conf").write_text(
            f"{auth}DbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={dbd_port}\nSlurmUser=root\n"
            f"StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\nStoragePort={db_port}\n"
            f"StorageUser=slurm\nStoragePass=catnet\nStorageLoc=slurm_acct_db\nPidFile={f / 'slurmdbd.pid'}\n"
            f"LogFile={f / 'slurmdbd.log'}\n")
        (f / "slurmdbd.conf").chmod(0o600)
        (f / "slurm.conf").write_text(
            f"ClusterName=catnet\nSlurmctldHost={self.node}(127.0.0.1)\nSlurmUser=root\n"
            f"SlurmctldPort={ctld_port}\nSlurmdPort={slurmd_port}\n{auth}CredType=cred/munge\n"
            f"StateSaveLocation={f / 'state'}\nSlurmdSpoolDir={f / 'spool'}\n"
            f"SlurmctldPidFile={f / 'slurmctld.pid'}\nSlurmdPidFile={f / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={f / 'slurmctld.log'}\nSlurmdLogFile={f / 'slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_Core\nJobAcctGatherType=jobacct_gather/none\nMpiDefault=none\n"
            f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
            f"AccountingStoragePort={dbd_port}\nAccountingStoragePass={f / 'munge.sock'}\n"
            "CommunicationParameters=NoInAddrAny\nReturnToService=2\nKillWait=10\n"
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory=2048 State=UNKNOWN\n"
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n")
        (f / "state").mkdir()
        (f / "spool").mkdir()
        self._start("slurmdbd", ["slurmdbd", "-D"], lambda: self._ok("sacctmgr", "-n", "list", "cluster"))
        subprocess.run(["sacctmgr", "-i", "add", "cluster", "catnet"], env=self.env, check=True, capture_output=True)
        self._start("slurmctld", ["slurmctld", "-D"], lambda: self._ok("scontrol", "ping"))
        self._start("slurmd", ["slurmd", "-D", "-N", self.node],
                    lambda: "idle" in subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True,
                                                     text=True).stdout)

    def stop(self) -> None:
        """Each daemon by its process id, the last started first; then any process left in its session."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for pid in _session_members([proc.pid]):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass

    def sacct(self) -> dict[str, str]:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State"], env=self.env, capture_output=True,
                             text=True, check=True).stdout
        return dict(line.split("|", 1) for line in out.splitlines() if line)


@pytest.fixture
def slurm():
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="catnet-slurm-"))
    folder.chmod(0o755)  # munged wants its socket reachable by every user
    cluster = Slurm(folder)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _slurm_sweep(slurm: Slurm, uri: str, tmp_path: Path, *args: str, background: bool = False):
    cmd = [sys.executable, "-m", "pipeline", "-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=1", "train.check_learned=false", f"tracking.uri={uri}", "tracking.experiment=test",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", *args]
    env = {k: v for k, v in slurm.env.items() if k != "HYDRA_FULL_ERROR"}
    if background:
        tmp_path.mkdir(parents=True, exist_ok=True)
        out = tmp_path / "sweep.log"
        return subprocess.Popen(cmd, env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT), out
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_sweep_on_slurm_lands_each_job_with_its_slurm_job_id(slurm, mlflow_server, tmp_path):
    """hydra/launcher=slurm on a real one-node SLURM cluster, into an mlflow server: 4 jobs of one
    job array, 4 FINISHED children under one parent, each tagged with the job SLURM ran it as."""
    import re

    proc = _slurm_sweep(slurm, mlflow_server.uri, tmp_path, "seed=0,1,2,3", "train.epochs=20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep: 4 jobs, 4 finished, 0 failed" in proc.stdout + proc.stderr
    parent = _whole_sweep(mlflow_server.uri, epochs=20)
    _, runs = runs_of(mlflow_server.uri)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    ids = sorted(r.data.tags["catnet.slurm.job_id"] for r in children)
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_{i}" for i in range(4)] and re.fullmatch(r"\d+", array)
    accounted = slurm.sacct()
    assert all(accounted[i] == "COMPLETED" for i in ids), accounted


@pytest.mark.slow
def test_a_failed_or_cancelled_slurm_job_is_counted_and_its_run_ends_killed(slurm, mlflow_server, tmp_path):
    """A job with a bad value fails alone (exit 1); `scancel` of a running job: its run KILLED
    (SIGTERM reached catnet, not submitit's handler), the sweep goes on with the other job and
    exits 1, counting the cancelled one failed with its SLURM state."""
    proc = _slurm_sweep(slurm, mlflow_server.uri, tmp_path / "a", "train.lr=0.01,-1", "train.epochs=20")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "sweep: 2 jobs, 1 finished, 1 failed" in proc.stdout + proc.stderr

    sweep, log = _slurm_sweep(slurm, mlflow_server.uri, tmp_path / "b", "train.epochs=200000,300",
                              background=True)
    try:
        client, target = None, None
        deadline = time.time() + 180
        while target is None:  # job _0's run, training
            assert sweep.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
            client, runs = runs_of(mlflow_server.uri)
            target = next((r for r in runs if r.info.status == "RUNNING"
                           and r.data.params.get("train.epochs") == "200000"), None)
        job = target.data.tags["catnet.slurm.job_id"]
        subprocess.run(["scancel", job], env=slurm.env, check=True)
        assert sweep.wait(timeout=300) == 1, log.read_text()[-3000:]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    text = log.read_text()
    assert f"SLURM job {job} ended CANCELLED" in text and "sweep: 2 jobs, 1 finished, 1 failed" in text
    run = client.get_run(target.info.run_id)
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags.get("catnet.failure", ""), run.data.tags
    assert slurm.sacct()[job].startswith("CANCELLED")
