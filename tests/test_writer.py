"""The record helper that writes a sweep's record (pipeline/tracking/writer.py, helper.py):
every point it is handed lands in the store, in order and in batches MLflow takes; what it cannot
write, or its death, fails the run that handed the points over, never silently."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import needs_data, runs_of, slow_metric_inserts

from pipeline.common import ROOT
from pipeline.tracking import writer


@pytest.fixture
def helper(store):
    client, _ = runs_of(store["uri"])  # the store's tables exist before the helper opens it
    w = writer.Helper.start(store["uri"])
    yield client, w
    w.close()


def _run(client) -> str:
    exp = client.get_experiment_by_name("test") or client.get_experiment(client.create_experiment("test"))
    return client.create_run(exp.experiment_id).info.run_id


def _points(first: int, last: int, key: str = "train/error") -> list[tuple[str, float, float, int]]:
    return [(key, 1.0 / e, 1_700_000_000.0 + e, e) for e in range(first, last + 1)]


def test_every_point_handed_over_is_written_across_batches_and_runs_then_the_run_ended(helper):
    client, w = helper
    a, b = _run(client), _run(client)
    for first in range(1, 2501, 250):  # 2,500 points in ten hand-overs: more than one of MLflow's batches
        w.send(a, _points(first, first + 249))
    w.send(b, _points(1, 3, "val/error"))
    w.end(a, "FINISHED", None)
    w.end(b, "KILLED", "KeyboardInterrupt: ")
    w.close()
    history = client.get_metric_history(a, "train/error")
    assert sorted(m.step for m in history) == list(range(1, 2501))
    assert all(m.value == pytest.approx(1.0 / m.step) for m in history)
    assert [m.step for m in client.get_metric_history(b, "val/error")] == [1, 2, 3]
    assert client.get_run(a).info.status == "FINISHED" and "catnet.failure" not in client.get_run(a).data.tags
    assert client.get_run(b).info.status == "KILLED"
    assert client.get_run(b).data.tags["catnet.failure"] == "KeyboardInterrupt: "


def test_what_a_run_hands_over_is_written_in_order_and_its_end_comes_last(helper, tmp_path):
    client, w = helper
    run = _run(client)
    folder = tmp_path / "private"
    folder.mkdir()
    (folder / "weights.npz").write_bytes(b"weights")
    w.call(run, "params", {"seed": "3"})
    w.send(run, _points(1, 10))
    w.call(run, "log_artifact", str(folder / "weights.npz"))
    w.call(run, "tags", {"catnet.model_uri": "none"})
    w.end(run, "FINISHED", None, str(folder))
    w.close()
    record = client.get_run(run)
    assert record.info.status == "FINISHED"
    assert record.data.params == {"seed": "3"} and record.data.tags["catnet.model_uri"] == "none"
    assert [a.path for a in client.list_artifacts(run)] == ["weights.npz"]
    assert len(client.get_metric_history(run, "train/error")) == 10
    assert not folder.exists()  # the run's private files go once logged


def test_a_run_whose_record_cannot_be_written_is_failed_with_the_reason_and_others_are_not(helper):
    client, w = helper
    bad, good = _run(client), _run(client)
    w.send(bad, _points(1, 5))
    w.send(bad, _points(6, 6, "bad/../name"))  # MLflow refuses this metric name
    w.send(good, _points(1, 5))
    w.call(bad, "tags", {"written": "no"})  # after the failure: dropped, not written
    w.end(bad, "FINISHED", None)
    w.end(good, "FINISHED", None)
    w.close()
    record = client.get_run(bad)
    assert record.info.status == "FAILED"
    assert "its record could not be written whole: MlflowException" in record.data.tags["catnet.failure"]
    assert "written" not in record.data.tags
    assert client.get_run(good).info.status == "FINISHED"  # the helper goes on for the other runs
    assert len(client.get_metric_history(good, "train/error")) == 5


def test_ctrl_c_at_the_helper_does_not_stop_it(helper):
    client, w = helper
    run = _run(client)
    w.send(run, _points(1, 10))
    deadline = time.monotonic() + 60
    while len(client.get_metric_history(run, "train/error")) < 10:  # it serves
        assert time.monotonic() < deadline and w.alive()
        time.sleep(0.05)
    assert os.getpgid(w.proc.pid) != os.getpgid(0)  # a terminal's Ctrl-C goes to the sweep's group only
    os.kill(w.proc.pid, signal.SIGINT)  # and sent to it, it does not stop it either
    os.kill(w.proc.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert w.alive()
    w.send(run, _points(11, 20))
    w.end(run, "FINISHED", None)
    w.close()
    assert w.proc.returncode == 0
    assert client.get_run(run).info.status == "FINISHED" and len(client.get_metric_history(run, "train/error")) == 20


def test_a_dead_helper_is_an_error_naming_its_exit_not_a_hang(helper):
    client, w = helper
    run = _run(client)
    w.proc.kill()
    w.proc.wait()
    with pytest.raises(writer.WriterLost, match=r"record helper ended \(exit -9"):
        for first in range(1, 10001, 1000):  # until the pipe to it breaks
            w.send(run, _points(first, first + 999))
        w.end(run, "FINISHED", None)


def test_a_job_does_not_wait_for_the_helper_to_import_mlflow(helper):
    """A helper started early (``start_early``: before its store is known) reads what it is handed
    while it still imports MLflow and has no store to write to, so a job handing over more than a
    pipe holds (64 KB) is done before the helper can write anything (the order of events, not a
    duration: a helper that read only once it knew its store would never let the hand-over end
    here), and all of it is written once the helper knows its store."""
    import threading

    client, _ = helper
    run = _run(client)
    early = writer.Helper.start("")
    try:
        def hand_over():
            for first in range(1, 8001, 1000):  # about 300 KB
                early.send(run, _points(first, first + 999))

        job = threading.Thread(target=hand_over, daemon=True)
        job.start()
        job.join(timeout=300)  # a hang guard only: a helper that does not read blocks it for good
        assert not job.is_alive(), "the hand-over waited for a helper that had no store yet"
        assert client.get_metric_history(run, "train/error") == []  # nothing written: the helper had no store
        early.tell_store(client.tracking_uri)
        early.end(run, "FINISHED", None)
    finally:
        early.close()
    assert early.proc.returncode == 0
    assert len(client.get_metric_history(run, "train/error")) == 8000
    assert client.get_run(run).info.status == "FINISHED"


def test_the_helper_writes_what_it_was_handed_before_its_input_ends_and_ends_only_runs_it_was_told_to(helper):
    client, w = helper
    ended, left = _run(client), _run(client)
    w.send(ended, _points(1, 1000))
    w.end(ended, "FINISHED", None)
    w.send(left, _points(1, 10))  # its job's process died before handing over its end
    w.close()  # the sweep's process ended
    assert w.proc.returncode == 0
    assert len(client.get_metric_history(ended, "train/error")) == 1000
    assert client.get_run(ended).info.status == "FINISHED"
    assert client.get_run(left).info.status == "RUNNING"  # for the sweep to close (parent.reconcile)
    assert len(client.get_metric_history(left, "train/error")) == 10


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
def test_a_run_hands_its_whole_record_to_the_helper_which_ends_it_last(started, store):
    from pipeline import tracking

    with tracking.open_run(started) as run:
        assert run.recorder.helper is writer.for_store(tracking.store_uri(started)[0]) is not None
        for epoch in range(1, 1501):
            run.log_epoch(epoch, {"train/error": 1.0 / epoch})
        run.log_metrics({"train/accuracy": 0.5})
    private = run.private
    writer.close()  # the sweep's end: what was handed over is written
    client, runs = runs_of(store["uri"])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert len(client.get_metric_history(runs[0].info.run_id, "train/error")) == 1500
    assert runs[0].data.metrics["train/accuracy"] == 0.5 and runs[0].data.params["seed"] == str(started.seed)
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id)] == ["config.yaml"]
    assert not private.exists()


@needs_data
def test_a_runs_end_time_is_when_its_job_ended_not_when_the_helper_wrote_it(started, store):
    """The helper is stopped (SIGSTOP) while the job ends and for 0.5 s after: the run's MLflow
    end time is still the job's end, which the UI's duration and the sweep's order show."""
    import psutil

    from pipeline import tracking

    helper = psutil.Process(writer.for_store(tracking.store_uri(started)[0]).proc.pid)
    with tracking.open_run(started) as run:
        run.log_epoch(1, {"train/error": 0.5})
        helper.suspend()
    ended = int(time.time() * 1000)
    time.sleep(0.5)
    helper.resume()
    writer.close()
    _, runs = runs_of(store["uri"])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].info.start_time <= runs[0].info.end_time <= ended


@needs_data
def test_a_run_whose_epochs_the_helper_could_not_write_is_failed_with_the_reason(started, store):
    from pipeline import tracking

    with tracking.open_run(started) as run:  # the job does not wait for the helper: it ends
        run.log_epoch(1, {"train/error": 0.5})
        run.log_epoch(2, {"bad/../name": 0.5})  # MLflow refuses this metric name
    writer.close()
    _, runs = runs_of(store["uri"])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "its record could not be written whole" in runs[0].data.tags["catnet.failure"]


# ---- in a sweep -----------------------------------------------------------------------------------

def _helpers_of(pid: int) -> list:
    import psutil

    found = []
    try:
        for child in psutil.Process(pid).children():
            if "pipeline.tracking.helper" in " ".join(child.cmdline()):
                found.append(child)
    except psutil.Error:  # the sweep or the child ended meanwhile
        pass
    return found


def _sweep(store, *args: str, epochs: int | str = 4000, seeds: str = "0,1,2,3") -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, "-m", "pipeline", "-m", f"seed={seeds}", f"train.epochs={epochs}", "sweep.reuse=false",
           f"hydra.sweep.dir={store['out']}", *store["args"], *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _children(store) -> dict:
    _, runs = runs_of(store["uri"])
    return {r.data.tags["mlflow.runName"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}


def _said_counts(out: str) -> tuple[int, int]:
    import re

    said = re.search(r"sweep: 4 jobs, (\d+) finished, (\d+) failed", out)
    assert said, out[-3000:]
    return int(said[1]), int(said[2])


@pytest.mark.slow
@needs_data
def test_a_sequential_sweep_writes_its_epochs_through_the_helper_and_a_dead_helper_fails_its_job(store):
    """The helper writes every job's record; killed while a job trains, that job is FAILED with the
    reason, the sweep goes on with the next jobs (written by themselves) and exits 1; what the
    sweep says of each job is what the store holds of its run. (The store's tables exist: a helper
    killed while MLflow creates them leaves a half-made store, which no process can open.)"""
    runs_of(store["uri"])
    proc = _sweep(store)
    lines, killed, training = [], None, None
    for line in proc.stdout:
        lines.append(line)
        if killed is None and sum("tracking: MLflow run " in seen for seen in lines) == 2:
            helpers = _helpers_of(proc.pid)  # the second job trains (4000 epochs)
            assert len(helpers) == 1, "".join(lines)[-2000:]
            killed, training = helpers[0], line.split("'")[1]
            killed.kill()
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out[-3000:]
    children = _children(store)
    status = {name: r.info.status for name, r in children.items()}
    assert training == "#1 seed=1" and status["#1 seed=1"] == "FAILED", out[-3000:]
    assert "record helper ended" in children["#1 seed=1"].data.tags["catnet.failure"]
    assert status["#2 seed=2"] == status["#3 seed=3"] == "FINISHED", out[-3000:]  # by themselves
    finished = sum(s == "FINISHED" for s in status.values())
    assert _said_counts(out) == (finished, 4 - finished), out[-3000:]  # #0: whatever the helper got to write
    assert out.count("write their records themselves from now on") == 1, out[-3000:]
    client, _ = runs_of(store["uri"])
    for name, r in children.items():
        if r.info.status == "FINISHED":  # whole, or FAILED with why: never a FINISHED run with a hole
            history = client.get_metric_history(r.info.run_id, "train/error")
            assert sorted(m.step for m in history) == list(range(1, 4001)), name
        else:
            assert r.data.tags.get("catnet.failure"), name
    assert not killed.is_running() or killed.status() == "zombie"
    # the sweep's process took the record over: the parent is there (made by the helper, or by the
    # sweep if the helper died first), FAILED with the counts the sweep said, every child under it
    _, runs = runs_of(store["uri"])
    top = [r for r in runs if r.data.tags.get("catnet.sweep") == "parent"]
    assert len(top) == 1 and top[0].info.status == "FAILED", out[-3000:]
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {top[0].info.run_id}
    assert (top[0].data.metrics["sweep/finished"], top[0].data.metrics["sweep/failed"]) == _said_counts(out)


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("knob", ["process", "thread"])
def test_a_job_whose_points_the_store_refuses_is_failed_though_it_trained_whoever_writes_them(store, knob):
    """The store refuses seed=1's points (a trigger of its own database): with the helper, after the
    job ended well; with the thread, before. Either way that job counts as failed, its run is
    FAILED with the store's words, the other three are FINISHED and the sweep exits 1."""
    import sqlite3

    runs_of(store["uri"])  # the store's tables
    db = sqlite3.connect(store["uri"][len("sqlite:///"):])
    db.execute("CREATE TRIGGER refuse_seed_1 BEFORE INSERT ON metrics WHEN NEW.run_uuid IN "
               "(SELECT run_uuid FROM params WHERE key = 'seed' AND value = '1') "
               "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    db.commit()
    db.close()
    proc = _sweep(store, f"tracking.sweep_writer={knob}", epochs=300)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1, out[-3000:]
    assert _said_counts(out) == (3, 1), out[-3000:]
    status = {name: r.info.status for name, r in _children(store).items()}
    assert status == {"#0 seed=0": "FINISHED", "#1 seed=1": "FAILED", "#2 seed=2": "FINISHED",
                      "#3 seed=3": "FINISHED"}, out[-3000:]
    assert "refused by the test" in _children(store)["#1 seed=1"].data.tags["catnet.failure"]
    assert "catnet: error: sweep: 1 of 4 jobs failed" in out, out[-3000:]


@pytest.mark.slow
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


@pytest.mark.slow
@needs_data
def test_a_sweep_stopped_after_a_job_ended_keeps_that_job_finished_and_kills_the_next(store):
    """SIGTERM as the second job starts, while the helper still writes the first job's record (the
    store takes a few ms a point, by a trigger of its own database): that record is written whole
    and its run stays FINISHED; the second is KILLED, as is the sweep."""

    runs_of(store["uri"])  # the store's tables
    slow_metric_inserts(store["uri"], 500)
    proc = _sweep(store, epochs="300,3000000", seeds="0")  # job #1 trains until stopped
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "#1 : " in line:  # Hydra launches the second job
            proc.send_signal(signal.SIGTERM)
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 143, out[-3000:]
    client, runs = runs_of(store["uri"])
    status = {r.data.tags["mlflow.runName"]: (r.info.status, r.data.tags.get("catnet.failure")) for r in runs}
    first = status.pop("#0 epochs=300")
    assert first == ("FINISHED", None), (first, out[-3000:])
    assert {s for s, _ in status.values()} == {"KILLED"}, status  # the sweep (and the second job, if it began)
    finished = next(r for r in runs if r.data.tags["mlflow.runName"] == "#0 epochs=300")
    assert len(client.get_metric_history(finished.info.run_id, "train/error")) == 300


def test_the_store_has_the_last_word_on_a_job_the_helper_recorded_after_it_ended(store):
    """parent.reconcile: a job that said FINISHED counts as FAILED when its run is not FINISHED, and
    a run the helper never ended is closed FAILED by the sweep (parent.settle); other jobs as said."""
    from mlflow.entities import RunTag

    from pipeline.tracking import parent

    client, _ = runs_of(store["uri"])
    exp = client.create_experiment("test")
    top = client.create_run(exp).info.run_id

    def child(status: str | None, reason: str | None = None) -> str:
        run = client.create_run(exp, tags={"mlflow.parentRunId": top}).info.run_id
        if reason:
            client.log_batch(run, tags=[RunTag("catnet.failure", reason)])
        if status:
            client.set_terminated(run, status)
        return run

    whole, refused, unended, failed = child("FINISHED"), child("FAILED", "refused"), child(None), child("FAILED", "x")
    said = [{"status": "FINISHED", "run": whole}, {"status": "FINISHED", "run": refused},
            {"status": "FINISHED", "run": unended}, {"status": "FAILED", "reason": "bad value", "run": failed},
            {"status": "FINISHED", "reused": "some run"}, {"status": "KILLED"}]
    checked = parent.reconcile(client, top, said)
    assert [o["status"] for o in checked] == ["FINISHED", "FAILED", "FAILED", "FAILED", "FINISHED", "KILLED"]
    assert checked[1]["reason"] == "refused" and checked[3]["reason"] == "bad value"
    assert checked[2]["unfinished"] == unended and "did not end its run" in checked[2]["reason"]
    assert parent.settle(client, top, checked) == []
    assert client.get_run(unended).info.status == "FAILED"
    assert "did not end its run" in client.get_run(unended).data.tags["catnet.failure"]
    assert client.get_run(whole).info.status == "FINISHED"


@needs_data
def test_a_store_the_helper_cannot_open_fails_the_sweep_with_the_reason_on_one_line(store):
    """The experiment is deleted: the helper, which opens the store while the first jobs train,
    says why; no job counts as a success (their runs could not be made), the sweep exits 1 with
    the store's reason on one line, no traceback."""
    client, _ = runs_of(store["uri"])
    client.delete_experiment(client.create_experiment("gone"))
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "-m", "seed=0,1,2", "train.epochs=100",
                           "train.check_learned=false", f"hydra.sweep.dir={store['out']}", *store["args"][:1],
                           "tracking.experiment=gone"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "sweep: 3 jobs, 0 finished, 3 failed" in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("catnet: error: sweep:")]
    assert len(errors) == 1 and "experiment='gone': this experiment is deleted" in errors[0], out[-3000:]
    assert "Traceback" not in out
    _, runs = runs_of(store["uri"], "gone")
    assert runs == []


@pytest.mark.slow
@needs_data
def test_a_sequential_sweep_never_imports_mlflow_and_its_helper_writes_the_whole_record(store):
    """The helper holds the sweep's record (Helper.open): the sweep's process trains its jobs
    without importing MLflow, and the store gets the record a sweep writing it itself gets
    (``tracking.sweep_writer=thread``): the parent with its summary and best child's model, every
    child FINISHED with its params, metrics, epochs, data and files, ends in order."""
    probe = ("import atexit, runpy, sys; atexit.register(lambda: print('mlflow imported:', 'mlflow' in sys.modules, "
             "file=sys.stderr)); sys.argv[0] = 'pipeline'; runpy.run_module('pipeline', run_name='__main__')")
    records = {}
    for knob in ("process", "thread"):
        env = {**os.environ}
        env.pop("HYDRA_FULL_ERROR", None)
        proc = subprocess.run([sys.executable, "-c", probe, "-m", "seed=0,1,2", "train.epochs=300", "sweep.reuse=false",
                               f"hydra.sweep.dir={store['out']}/{knob}", f"tracking.sweep_writer={knob}",
                               *store["args"][:1], f"tracking.experiment={knob}"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"mlflow imported: {knob == 'thread'}" in proc.stderr, proc.stderr[-2000:]
        records[knob], children = _sweep_record(store, knob, order=lambda r: r.info.start_time)
        assert all(a.info.end_time <= b.info.start_time for a, b in zip(children, children[1:]))
    _assert_alike(records)


def _sweep_record(store, experiment: str, order) -> tuple[dict, list]:
    """A 3-job sweep's record in ``experiment``, what two ways of writing it must agree on (its
    children in ``order``), and the children's runs; its parent has the best child's model."""
    client, runs = runs_of(store["uri"], experiment)
    top = [r for r in runs if r.data.tags.get("catnet.sweep") == "parent"]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=order)
    assert len(top) == 1 and [r.data.tags["mlflow.parentRunId"] for r in children] == [top[0].info.run_id] * 3
    best = client.get_run(top[0].data.tags["catnet.best_run_id"])
    assert best.data.tags["catnet.model_uri"].startswith("models:/")
    return {
        "parent": (top[0].info.status, sorted(top[0].data.params), sorted(top[0].data.metrics),
                   sorted(k for k in top[0].data.tags if k != "catnet.pid_started")),
        "children": [(r.info.run_name, r.info.status, r.data.params, sorted(r.data.metrics),
                      sorted(r.data.tags), sorted(a.path for a in client.list_artifacts(r.info.run_id)),
                      len(client.get_metric_history(r.info.run_id, "train/error")),
                      [d.dataset.digest for d in r.inputs.dataset_inputs]) for r in children],
    }, children


def _assert_alike(records: dict) -> None:
    """The helper's record (``process``) is whole and is the one jobs writing their own make."""
    assert records["process"]["parent"][0] == "FINISHED"
    assert [c[1] for c in records["process"]["children"]] == ["FINISHED"] * 3
    assert [c[6] for c in records["process"]["children"]] == [300] * 3
    differ = ("tracking.sweep_writer", "tracking.experiment")  # the only params the two sweeps differ in
    for a, b in zip(records["process"]["children"], records["thread"]["children"]):
        assert a[:2] + a[3:] == b[:2] + b[3:]
        assert {k: v for k, v in a[2].items() if k not in differ} == {k: v for k, v in b[2].items() if k not in differ}
    assert records["process"]["parent"] == records["thread"]["parent"]


@pytest.mark.slow
def test_the_early_helper_starts_only_for_a_sweep_that_may_use_it_and_ends_with_its_process():
    """``python -m pipeline -m`` starts the helper before its imports (pipeline/early.py) unless the
    command line says the sweep will not use it; a process that ends without handing it anything
    (a config error, a sweep that turned out not to use it) leaves no helper behind."""
    import psutil

    script = ("import sys; from pipeline import early; early.start(sys.argv[1:]); "
              "print(len(early.STARTED), early.STARTED[0][0].pid if early.STARTED else 0, flush=True)")
    cases = [(["-m", "seed=0,1"], 1), (["hydra.mode=MULTIRUN"], 1), (["seed=0"], 0),
             (["-m", "hydra/launcher=joblib"], 1), (["-m", "hydra/launcher=basic"], 1),
             (["-m", "hydra/launcher=ray_local"], 0), (["-m", "tracking.enabled=False"], 0),
             (["-m", "tracking.uri=http://127.0.0.1:5000"], 0), (["--multirun", "tracking.sweep_writer=thread"], 0)]
    for argv, expected in cases:
        proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        started, pid = map(int, proc.stdout.split())
        assert started == expected, (argv, proc.stderr[-2000:])
        if pid:
            deadline = time.monotonic() + 60
            while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline, f"the helper {pid} outlived its process"
                time.sleep(0.1)


# ---- a joblib sweep: its workers' jobs hand their records to the same helper ----------------------

_MARK_IMPORTS = '''import os, sys


class _Mark:  # a test's probe: which processes import MLflow (process name and command line, a file each)
    def find_spec(self, name, path=None, target=None):
        if name == "mlflow" and os.environ.get("CATNET_TEST_MLFLOW_IMPORTS"):
            import multiprocessing

            with open(os.path.join(os.environ["CATNET_TEST_MLFLOW_IMPORTS"], str(os.getpid())), "w") as f:
                f.write(multiprocessing.current_process().name + " " + " ".join(sys.argv))
        return None


sys.meta_path.insert(0, _Mark())
'''


def _joblib_record(store, knob: str, tmp) -> tuple[dict, list[str]]:
    """A 3-job joblib sweep with ``tracking.sweep_writer=<knob>``: its record, and the command
    lines of the processes that imported MLflow (a sitecustomize probe every process loads)."""
    probe, marks = tmp / f"probe-{knob}", tmp / f"marks-{knob}"
    probe.mkdir()
    marks.mkdir()
    (probe / "sitecustomize.py").write_text(_MARK_IMPORTS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(probe), os.environ.get("PYTHONPATH")])),
           "CATNET_TEST_MLFLOW_IMPORTS": str(marks)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "-m", "seed=0,1,2", "train.epochs=300",
                           "sweep.reuse=false", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                           f"hydra.sweep.dir={store['out']}/{knob}",
                           f"tracking.sweep_writer={knob}", *store["args"][:1], f"tracking.experiment={knob}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record, _ = _sweep_record(store, knob, order=lambda r: r.info.run_name)  # jobs side by side: by name
    return record, [p.read_text() for p in marks.iterdir()]


@pytest.mark.slow
@needs_data
def test_a_joblib_sweep_imports_mlflow_only_in_its_helper_which_writes_the_whole_record(store, tmp_path):
    """A joblib sweep into SQLite hands its workers' records to the sweep's helper through its
    socket: neither the sweep's process nor its workers import MLflow (only the helper does), and
    the store gets the record of the same sweep whose workers write their own (``thread``)."""
    runs_of(store["uri"])  # the store's tables: the probe's process lines are what is compared
    records, imported = {}, {}
    for knob in ("process", "thread"):
        records[knob], imported[knob] = _joblib_record(store, knob, tmp_path)
    assert len(imported["process"]) == 1 and "catnet-record-" in imported["process"][0], imported["process"]
    importers = sorted(argv.split()[0] for argv in imported["thread"])  # the probe sees the workers and the
    assert importers == ["LokyProcess-1", "LokyProcess-2", "MainProcess"], imported["thread"]  # sweep's process
    _assert_alike(records)


@pytest.mark.slow
@needs_data
def test_a_joblib_sweeps_helper_killed_mid_sweep_fails_only_what_it_lost_and_the_workers_go_on(store):
    """The helper is killed while both workers train: a job that had handed it part of its record
    is FAILED with the reason (or, if the helper wrote it all, FINISHED whole); the workers'
    later jobs write their own records; the sweep's process makes the parent if it was lost, and
    the parent holds the counts the sweep says. (The store's tables exist: a helper killed while
    MLflow creates them leaves a half-made store, which no process can open.)"""
    runs_of(store["uri"])
    proc = _sweep(store, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", epochs=20000)
    lines, killed = [], None
    for line in proc.stdout:
        lines.append(line)
        if killed is None and sum("tracking: MLflow run " in seen for seen in lines) == 2:
            helpers = _helpers_of(proc.pid)
            assert len(helpers) == 1, "".join(lines)[-2000:]
            killed = helpers[0]
            killed.kill()
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert killed is not None and proc.returncode == 1, out[-3000:]
    children = _children(store)
    client, _ = runs_of(store["uri"])
    for name, r in children.items():
        if r.info.status == "FINISHED":  # whole, or FAILED with why: never a FINISHED run with a hole
            history = client.get_metric_history(r.info.run_id, "train/error")
            assert len(history) == 10000 and r.data.params["seed"] == name.split("=")[1], name
        else:
            assert r.info.status == "FAILED" and r.data.tags["catnet.failure"], (name, out[-3000:])
    finished = sum(r.info.status == "FINISHED" for r in children.values())
    assert finished < 4 and _said_counts(out) == (finished, 4 - finished), out[-3000:]  # a run it lost: said
    assert children["#2 seed=2"].info.status == children["#3 seed=3"].info.status == "FINISHED", out[-3000:]
    assert 1 <= out.count("write their records themselves from now on") <= 2, out[-3000:]  # once a worker
    _, runs = runs_of(store["uri"])
    top = [r for r in runs if r.data.tags.get("catnet.sweep") == "parent"]
    assert len(top) == 1 and top[0].info.status == "FAILED", out[-3000:]
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {top[0].info.run_id}
    assert (top[0].data.metrics["sweep/finished"], top[0].data.metrics["sweep/failed"]) == _said_counts(out)


def test_a_workers_connection_to_a_helper_that_died_is_seen_closed_before_a_job_hands_it_anything(helper):
    """A joblib worker asks, before each job, whether the sweep's helper is still there: a helper
    killed between two jobs (not yet reaped by the sweep's process: a zombie, whose process id
    still answers) is gone for it, so the next job writes its own record instead of failing."""
    import psutil

    _, w = helper
    connected = writer.Helper.connect(w.uri, w.socket, w.proc.pid)
    assert connected.alive()
    w.proc.kill()
    deadline = time.monotonic() + 30
    while psutil.Process(w.proc.pid).status() != psutil.STATUS_ZOMBIE or connected.alive():
        assert time.monotonic() < deadline, "the connection of a helper that died is still taken as alive"
        time.sleep(0.05)
    assert psutil.Process(w.proc.pid).status() == psutil.STATUS_ZOMBIE  # its process id still answers
    assert not connected.alive()
