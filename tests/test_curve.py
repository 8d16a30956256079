"""The learning-curve PNG: drawn by a helper process beside a tracked single run."""

from __future__ import annotations

import numpy as np
import psutil
import pytest
from conftest import needs_data, run_cli

from catnet.errors import CatnetError
from pipeline import curve

HISTORY = {"train/error": np.geomspace(20.0, 0.5, 300), "val/error": np.geomspace(25.0, 2.0, 300)}


def test_the_helper_draws_the_same_png_as_the_run_would():
    with curve.helper() as drawer:
        png = curve.png(HISTORY, "training error (sse)", "hidden [20, 7], lr 0.005, seed 0", drawer)()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert png == curve.png(HISTORY, "training error (sse)", "hidden [20, 7], lr 0.005, seed 0")()
    assert png != curve.png(HISTORY, "training error (sse)", "hidden [20, 7], lr 0.005, seed 1")()


def test_a_helper_that_drew_nothing_is_gone_after_its_block_and_one_that_died_is_an_error():
    with curve.helper() as drawer:
        pid = drawer.proc.pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with curve.helper() as drawer:
        drawer.proc.kill()
        with pytest.raises(CatnetError, match=r"^learning curve: its drawing process failed \(exit -9: "):
            curve.png(HISTORY, "error", "title", drawer)()


def test_a_helper_whose_run_is_gone_ends_at_the_end_of_its_input():
    """The run was killed (SIGKILL) before it sent a history: the helper reads the end of its
    input, and ends without drawing."""
    with curve.helper() as drawer:
        drawer.proc.stdin.close()
        assert drawer.proc.wait(timeout=60) == 0
        assert drawer.proc.stdout.read() == b""


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("tracked", [True, False])
def test_a_single_run_leaves_matplotlib_to_the_helper(store, tracked):
    """Python's import profile (on the command's stderr; the helper's goes to the run, which
    drops it) shows that the run's own process never imports matplotlib."""
    proc = run_cli("train.epochs=5", "train.check_learned=false", *store["args"], f"tracking.enabled={tracked}",
                   env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert (store["out"] / "reports/learning_curve.png").read_bytes().startswith(b"\x89PNG")
    assert "| pipeline.curve" in proc.stderr  # the profile is on: the next line can fail
    assert "| matplotlib.pyplot" not in proc.stderr


@pytest.mark.parametrize("argv, starts", [
    ([], True), (["train.lr=0.01", "seed=3"], True), (["-m", "seed=0,1"], False), (["--multirun"], False),
    (["--cfg", "job"], False), (["--cfg=job"], False), (["--help"], False), (["hydra.mode=MULTIRUN"], False),
])
def test_the_helper_starts_first_thing_only_for_a_single_run(argv, starts, monkeypatch):
    started = []
    monkeypatch.setattr(curve, "Helper", lambda: started.append(1) or _Stub())
    monkeypatch.setattr(curve, "_EARLY", [])
    curve.start_early(argv)
    assert bool(started) is starts
    with curve.helper(enabled=False) as drawer:  # a sweep's job: the early one is closed, none made
        assert drawer is None
    assert curve._EARLY == [] and all(s.closed for s in _Stub.made)


class _Stub:
    made: list = []

    def __init__(self):
        self.closed = False
        _Stub.made.append(self)

    def close(self):
        self.closed = True
