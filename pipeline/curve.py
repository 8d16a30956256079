"""The learning-curve PNG of a single run, drawn by a helper process beside it.

Importing matplotlib and drawing takes about 0.8 s, longer than training the default network.
A single run (``python -m pipeline``, the train stage) starts the helper, ``python -m
pipeline.curve``, first thing, before Hydra composes its config: matplotlib is imported and a
first figure drawn on another core while the run composes, reads the data, imports MLflow and
trains. When training ends, the helper reads the history on its stdin and answers with the PNG
on its stdout, while the run goes on (evaluates, logs its model): the run writes the PNG last
(``NullRun.log_output_later``). A helper that gets no history (the command turned out to be no run, or failed
before training) is killed when the command ends, or ends at the end of its input if the
command was killed.
"""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

from catnet.errors import CatnetError

TIMEOUT = 120  # seconds: drawing takes well under one


def plot(f, history: dict[str, np.ndarray], ylabel: str, title: str) -> None:
    """Draw each history (one value per epoch, log scale) into ``f`` as a PNG."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, values in history.items():
        ax.plot(np.arange(1, len(values) + 1), values, label=name)
    ax.legend()
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(f, format="png")
    plt.close(fig)


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


class Helper:
    """A started ``python -m pipeline.curve``, waiting for one history to draw."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.curve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def request(self, history: dict[str, np.ndarray], ylabel: str, title: str) -> None:
        """Hand it the history to draw; ``result`` gives the PNG."""
        buf = io.BytesIO()
        np.savez(buf, ylabel=np.str_(ylabel), title=np.str_(title), names=np.array(list(history), dtype=np.str_),
                 **{f"history_{i}": np.asarray(v) for i, v in enumerate(history.values())})
        stdin, self.proc.stdin = self.proc.stdin, None  # closed here: communicate() must not touch it
        try:
            stdin.write(buf.getvalue())
            stdin.close()
        except (BrokenPipeError, OSError):  # it ended: result() says how
            pass

    def result(self) -> bytes:
        """The PNG of the history handed over (waits for it)."""
        try:
            png, err = self.proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.close()
            raise CatnetError(f"learning curve: its drawing process gave no PNG within {TIMEOUT} s") from None
        if self.proc.returncode != 0 or not png:
            last = (err.decode(errors="replace").strip().splitlines() or ["no message"])[-1]
            raise CatnetError(f"learning curve: its drawing process failed (exit {self.proc.returncode}: {last})")
        return png

    def close(self) -> None:
        if self.proc.returncode is None:  # it drew nothing: no need to wait for its imports
            self.proc.kill()
            self.proc.communicate()


NOT_A_RUN = {"-m", "--multirun", "-c", "--cfg", "-p", "--package", "-h", "--help", "--hydra-help", "-i", "--info",
             "-sc", "--shell-completion", "--version"}  # Hydra's flags for a sweep or for no run at all
_EARLY: list[Helper] = []  # the helper started first thing, until the run takes it


def start_early(argv: list[str]) -> None:
    """Start the helper now if the command line (Hydra's) asks for a single run."""
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    if flags & NOT_A_RUN or any(a.startswith("hydra.mode=") for a in argv) or _EARLY:
        return
    import atexit

    _EARLY.append(Helper())
    atexit.register(_close_early)


def _close_early() -> None:
    while _EARLY:
        _EARLY.pop().close()


@contextmanager
def helper(enabled: bool = True) -> Iterator[Helper | None]:
    """A helper for the block, never left behind it: the one started early, else a new one
    (None unless ``enabled``)."""
    started = _EARLY.pop() if _EARLY else None
    if started is not None and not enabled:
        started.close()
        started = None
    elif started is None and enabled:
        started = Helper()
    try:
        yield started
    finally:
        if started is not None:
            started.close()


def png(history: dict[str, np.ndarray], ylabel: str, title: str, drawer: Helper | None = None) -> Callable[[], bytes]:
    """What gives the PNG: ``drawer``, if the run started one, draws it from now on while the run
    goes on; else it is drawn in this process when asked for."""
    if drawer is not None:
        drawer.request(history, ylabel, title)
        return drawer.result

    def draw() -> bytes:
        buf = io.BytesIO()
        plot(buf, history, ylabel, title)
        return buf.getvalue()

    return draw


def _serve() -> int:
    import gc
    import os

    gc.disable()  # a process that draws one figure and ends
    if hasattr(os, "nice"):  # the run's own work (training on every core) goes first
        os.nice(10)
    pyplot()  # now, while the run goes on; and a first figure, which loads what every figure needs
    plot(io.BytesIO(), {"warm-up": np.array([2.0, 1.0])}, "error", "warm-up")
    data = sys.stdin.buffer.read()
    if not data:  # the run ended without a history to draw
        return 0
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        history = {str(name): f[f"history_{i}"] for i, name in enumerate(f["names"])}
        ylabel, title = str(f["ylabel"]), str(f["title"])
    out = io.BytesIO()
    plot(out, history, ylabel, title)
    sys.stdout.buffer.write(out.getvalue())
    sys.stdout.buffer.flush()
    os._exit(0)  # the run waits for this process's end: no tearing down of matplotlib's modules


if __name__ == "__main__":
    sys.exit(_serve())
