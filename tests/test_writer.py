"""The helper process that writes a sequential sweep's per-epoch metrics (pipeline/tracking/writer.py):
every point it is handed lands in the store, in order and in batches MLflow takes; what it cannot
write, or its death, fails the run that handed the points over, never silently."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import needs_data, runs_of

from pipeline.common import ROOT
from pipeline.tracking import writer


@pytest.fixture
def helper(store):
    client, _ = runs_of(store["uri"])  # the store's tables exist before the helper opens it
    w = writer.Writer(store["uri"])
    yield client, w
    w.close()


def _run(client) -> str:
    exp = client.get_experiment_by_name("test") or client.get_experiment(client.create_experiment("test"))
    return client.create_run(exp.experiment_id).info.run_id


def _points(first: int, last: int, key: str = "train/error") -> list[tuple[str, float, float, int]]:
    return [(key, 1.0 / e, 1_700_000_000.0 + e, e) for e in range(first, last + 1)]


def test_every_point_handed_over_is_written_across_batches_and_runs(helper):
    client, w = helper
    a, b = _run(client), _run(client)
    for first in range(1, 2501, 250):  # 2,500 points in ten hand-overs: more than one of MLflow's batches
        w.send(a, _points(first, first + 249))
    w.send(b, _points(1, 3, "val/error"))
    w.sync(a)
    w.sync(b)
    history = client.get_metric_history(a, "train/error")
    assert sorted(m.step for m in history) == list(range(1, 2501))
    assert all(m.value == pytest.approx(1.0 / m.step) for m in history)
    assert [m.step for m in client.get_metric_history(b, "val/error")] == [1, 2, 3]


def test_a_run_whose_points_cannot_be_written_is_told_and_others_are_not(helper):
    client, w = helper
    good = _run(client)
    w.send("no-such-run", _points(1, 5))
    w.send(good, _points(1, 5))
    with pytest.raises(writer.WriterLost, match="no-such-run"):
        w.sync("no-such-run")
    w.sync(good)  # the helper goes on for the other runs
    assert len(client.get_metric_history(good, "train/error")) == 5


def test_ctrl_c_at_the_helper_does_not_stop_it(helper):
    client, w = helper
    run = _run(client)
    w.send(run, _points(1, 10))
    w.sync(run)  # it serves
    assert os.getpgid(w.proc.pid) != os.getpgid(0)  # a terminal's Ctrl-C goes to the sweep's group only
    os.kill(w.proc.pid, signal.SIGINT)  # and sent to it, it does not stop it either
    os.kill(w.proc.pid, signal.SIGTERM)
    time.sleep(0.5)
    w.send(run, _points(11, 20))
    w.sync(run)
    assert w.alive() and len(client.get_metric_history(run, "train/error")) == 20


def test_a_dead_helper_is_an_error_naming_its_exit_not_a_hang(helper):
    client, w = helper
    run = _run(client)
    w.proc.kill()
    w.proc.wait()
    with pytest.raises(writer.WriterLost, match=r"process ended \(exit -9"):
        w.send(run, _points(1, 10))
        w.sync(run)


def test_the_helper_writes_what_it_was_handed_before_its_input_ends(helper):
    client, w = helper
    run = _run(client)
    w.send(run, _points(1, 1000))
    w.close()  # no sync: the sweep's process ended
    assert w.proc.returncode == 0
    assert len(client.get_metric_history(run, "train/error")) == 1000


@pytest.fixture
def started(compose_cfg, store):
    """This process's helper, started as a sweep starts it, for a run of ``cfg``."""
    from pipeline.tracking import store as stores

    cfg = compose_cfg(*store["args"][:1], "tracking.experiment=test")
    runs_of(store["uri"])
    writer.start(stores.store_uri(cfg)[0])
    yield cfg
    writer.close()


@needs_data
def test_a_run_ends_only_once_the_helper_wrote_its_epochs(started, store):
    from pipeline import tracking

    with tracking.open_run(started) as run:
        assert run._helper is writer.for_store(tracking.store_uri(started)[0]) is not None
        for epoch in range(1, 1501):
            run.log_epoch(epoch, {"train/error": 1.0 / epoch})
    client, runs = runs_of(store["uri"])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert len(client.get_metric_history(runs[0].info.run_id, "train/error")) == 1500


@needs_data
def test_a_run_whose_epochs_the_helper_could_not_write_is_failed_with_the_reason(started, store):
    from pipeline import tracking

    with pytest.raises(writer.WriterLost):
        with tracking.open_run(started) as run:
            run.log_epoch(1, {"train/error": 0.5})
            run.log_epoch(2, {"bad/../name": 0.5})  # MLflow refuses this metric name
    _, runs = runs_of(store["uri"])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "metric writer could not write run" in runs[0].data.tags["catnet.failure"]


# ---- in a sweep -----------------------------------------------------------------------------------

def _helpers_of(pid: int) -> list:
    import psutil

    found = []
    try:
        for child in psutil.Process(pid).children():
            if "pipeline.tracking.writer" in " ".join(child.cmdline()):
                found.append(child)
    except psutil.Error:  # the sweep or the child ended meanwhile
        pass
    return found


@needs_data
def test_a_sequential_sweep_writes_its_epochs_through_the_helper_and_a_dead_helper_fails_its_job(store):
    """The helper writes every job's epochs; killed while a job trains, that job is FAILED with the
    reason, the sweep goes on with the next jobs (written by their own thread) and exits 1."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "pipeline", "-m", "seed=0,1,2,3", "train.epochs=4000", "sweep.reuse=false",
           f"hydra.sweep.dir={store['out']}", *store["args"]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, killed = [], None
    for line in proc.stdout:
        lines.append(line)
        if killed is None and sum("tracking: MLflow run " in seen for seen in lines) == 2:
            helpers = _helpers_of(proc.pid)  # the second job trains (4000 epochs: about a second)
            assert len(helpers) == 1, "".join(lines)[-2000:]
            killed = helpers[0]
            killed.kill()
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out[-3000:]
    assert "sweep: 4 jobs, 3 finished, 1 failed" in out, out[-3000:]
    _, runs = runs_of(store["uri"])
    children = {r.data.tags["mlflow.runName"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    status = {name: r.info.status for name, r in children.items()}
    assert status == {"#0 seed=0": "FINISHED", "#1 seed=1": "FAILED", "#2 seed=2": "FINISHED",
                      "#3 seed=3": "FINISHED"}, out[-3000:]
    assert "metric writer process ended" in children["#1 seed=1"].data.tags["catnet.failure"]
    assert out.count("write their epochs from their own thread from now on") == 1, out[-3000:]
    client, _ = runs_of(store["uri"])
    for name in ("#0 seed=0", "#2 seed=2", "#3 seed=3"):  # by the helper, then by each job's thread
        history = client.get_metric_history(children[name].info.run_id, "train/error")
        assert sorted(m.step for m in history) == list(range(1, 4001)), name
    assert not killed.is_running() or killed.status() == "zombie"


@needs_data
def test_the_helper_ends_with_its_sweep_and_thread_writes_without_one(store):
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    for knob in ("process", "thread"):
        cmd = [sys.executable, "-m", "pipeline", "-m", "seed=0,1", "train.epochs=300", "sweep.reuse=false",
               f"tracking.sweep_writer={knob}", f"hydra.sweep.dir={store['out'] / knob}", *store["args"]]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen: set[int] = set()
        while proc.poll() is None:
            seen.update(h.pid for h in _helpers_of(proc.pid))
            time.sleep(0.05)
        out = proc.communicate()[0]
        assert proc.returncode == 0, out[-3000:]
        assert len(seen) == (1 if knob == "process" else 0), (knob, seen)
        assert "best '#" in out and "Downloading artifacts" not in out, out[-3000:]  # the model, without a bar
        assert not any(_alive(pid) for pid in seen)
    client, runs = runs_of(store["uri"])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    for r in children:
        assert len(client.get_metric_history(r.info.run_id, "train/error")) == 300


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_bad_sweep_writer_is_refused_on_one_line(store):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "-m", "seed=0", "tracking.sweep_writer=fork",
                           *store["args"]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "catnet: error: tracking.sweep_writer='fork': must be one of process, thread" in proc.stderr
    assert "Traceback" not in proc.stderr
