"""A sequential sweep's per-epoch metrics, written by a helper process on another core.

Writing a run's 1,000 epoch points costs MLflow's SQL store about as long as training the
default network (its ORM, in Python). A thread of the job's process cannot overlap the two: both
need the interpreter's lock. So a sweep whose jobs run one after another in its own process
(Hydra's basic launcher) starts this helper when it starts (``start``), while it imports MLflow
and creates the parent run itself. Each job's run (pipeline/tracking/run.py) hands its buffered
points to the helper every ``SEND_SECONDS`` while it trains, and its BLAS leaves the helper a
core (pipeline/__main__.py); the helper writes them as they come, and ``sync`` waits until
everything the run handed over is written, or raises what went wrong. The run ends (its status)
only after that, from the job's process, as with the thread.

The helper runs in a session of its own and ignores Ctrl-C and SIGTERM: the job decides, and waits
for the points already handed over (a stopped job's run is KILLED with them). It ends when its
input ends: the sweep closes it (``close``), or the sweep's process died. A helper that dies fails
the run it was writing for (WriterLost); the sweep's later jobs write from their own thread.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
from collections import OrderedDict

from catnet.errors import CatnetError

log = logging.getLogger("catnet")
SEND_SECONDS = 0.1  # a job hands its buffer to the helper at least this often while it trains
_HEADER = struct.Struct("!I")
SERVE = "import sys; from pipeline.tracking.writer import serve; sys.exit(serve(sys.argv[1]))"


class WriterLost(CatnetError):
    """The helper could not write a run's points, or ended: the run fails with this reason."""


class Writer:
    """A started helper writing to the store at ``uri``."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.errors = tempfile.TemporaryFile()  # its stderr, for the reason it ended
        # in a session of its own: a terminal's Ctrl-C, sent to the sweep's process group, reaches
        # the job, which then waits for this helper to write what it was handed
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, start_new_session=True)
        self.seq = 0
        self.reported = False  # whether the log said that it ended

    def send(self, run_id: str, points: list[tuple[str, float, float, int]]) -> None:
        self._put(("points", run_id, points))

    def sync(self, run_id: str) -> None:
        """Wait until every point handed over for ``run_id`` is written; raise what failed."""
        self.seq += 1
        self._put(("sync", run_id, self.seq))
        while True:  # an earlier sync stopped by Ctrl-C left its answer unread: skip it
            seq, error = self._get()
            if seq == self.seq:
                break
        if error is not None:
            raise WriterLost(f"the metric writer could not write run {run_id}'s epochs: {error}")

    def _put(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(_HEADER.pack(len(data)) + data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            raise WriterLost(self._ended()) from None

    def _get(self) -> tuple:
        header = self.proc.stdout.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise WriterLost(self._ended())
        return pickle.loads(self.proc.stdout.read(_HEADER.unpack(header)[0]))

    def _ended(self) -> str:
        code = self.proc.wait()
        self.errors.seek(0)
        last = (self.errors.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        return f"the metric writer process ended (exit {code}: {last[:300]})"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        """End its input; it writes what it has, then exits."""
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.errors.close()


_STARTED: list[Writer] = []  # this process's helper, if a sweep started one


def start(uri: str) -> None:
    """Start this process's helper for the store at ``uri`` (closed when the process exits)."""
    if _STARTED:
        return
    import atexit

    _STARTED.append(Writer(uri))
    atexit.register(close)


def for_store(uri: str) -> Writer | None:
    """The helper started for ``uri``, if it is still there (if it ended, the log says so once:
    the jobs write their epochs from their own thread from then on)."""
    for w in _STARTED:
        if w.uri != uri:
            continue
        if w.alive():
            return w
        if not w.reported:
            w.reported = True
            log.warning("tracking: %s; the sweep's jobs write their epochs from their own thread from now on",
                        w._ended())
    return None


def running() -> bool:
    """Whether this process has a helper that is still there."""
    return any(w.alive() for w in _STARTED)


def close() -> None:
    while _STARTED:
        _STARTED.pop().close()


# ---- the helper's side -----------------------------------------------------------------------------

class _Frames:
    """Length-prefixed pickles from a file descriptor, with a look at whether one is waiting."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf, self.eof = fd, bytearray(), False

    def _complete(self) -> bool:
        return len(self.buf) >= _HEADER.size and len(self.buf) >= _HEADER.size + _HEADER.unpack_from(self.buf)[0]

    def next(self, block: bool):
        """The next message; None if none is waiting (``block`` False); EOFError at the end."""
        while not self._complete():
            if self.eof:
                raise EOFError
            if not block and not select.select([self.fd], [], [], 0)[0]:
                return None
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                self.eof = True
                continue
            self.buf += chunk
        size = _HEADER.unpack_from(self.buf)[0]
        message = pickle.loads(self.buf[_HEADER.size:_HEADER.size + size])
        del self.buf[:_HEADER.size + size]
        return message


def serve(uri: str) -> int:
    """The helper's life: read points, write them, answer syncs, until its input ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the job decides; its input's end ends this
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from pipeline.tracking import store

    store.import_code(uri)
    import mlflow
    from mlflow.entities import Metric

    client = None  # made at the first write: opening a new SQLite store creates its tables, which
    # the sweep does, before any job's run exists
    frames, out = _Frames(sys.stdin.fileno()), sys.stdout.buffer
    pending: OrderedDict[str, list] = OrderedDict()  # run id -> points not yet written
    errors: dict[str, str] = {}  # run id -> why its points could not be written

    def write_pending() -> None:
        nonlocal client
        while pending:
            run_id, points = pending.popitem(last=False)
            if run_id in errors:  # the run fails anyway: its later points are dropped
                continue
            try:
                if client is None:
                    client = mlflow.MlflowClient(tracking_uri=uri)
                client.log_batch(run_id, metrics=[Metric(k, float(v), int(t * 1000), e) for k, v, t, e in points])
            except Exception as e:  # noqa: BLE001 - said to the job at its sync
                errors[run_id] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:1000]

    while True:
        try:
            message = frames.next(block=not pending)
        except EOFError:
            write_pending()
            return 0
        if message is None:  # nothing more waiting: write what came
            write_pending()
        elif message[0] == "points":
            pending.setdefault(message[1], []).extend(message[2])
        elif message[0] == "sync":
            write_pending()
            data = pickle.dumps((message[2], errors.pop(message[1], None)))
            out.write(_HEADER.pack(len(data)) + data)
            out.flush()

