"""A sequential sweep's per-epoch metrics, written by a helper process on another core.

Writing a run's 1,000 epoch points costs MLflow's SQL store about as long as training the
default network (its ORM, in Python). A thread of the job's process cannot overlap the two: both
need the interpreter's lock. So a sweep whose jobs run one after another in its own process
(Hydra's basic launcher) into a SQLite store starts this helper when it starts (``start``), while it imports MLflow
and creates the parent run itself. Each job's run (pipeline/tracking/run.py) creates itself, then
hands the helper everything else it records, in order: its buffered points every ``SEND_SECONDS``
while it trains (its BLAS leaves the helper a core: pipeline/__main__.py), its params, files,
final metrics and tags (``call``), and last its end (``end``). The job does not wait: the next one
starts while the helper writes. The helper sets a run's status only after everything handed over
for it is written; what it could not write makes the run FAILED with the reason (tag
catnet.failure). The sweep, once it closed the helper (``close``), takes each run's status in the
store as the final word on its job (pipeline/tracking/parent.py: reconcile), so a job whose
record failed after it ended is counted failed, and a run the helper never ended is closed FAILED.

The helper runs in a session of its own and ignores Ctrl-C and SIGTERM: the job decides, and what
it handed over is still written (a stopped job's run is KILLED with it). It ends when its input
ends: the sweep closes it, or the sweep's process died. A helper that dies fails the run it was
writing for (WriterLost); the sweep's later jobs write from their own thread.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections import OrderedDict

from catnet.errors import CatnetError

log = logging.getLogger("catnet")
SEND_SECONDS = 0.1  # a job hands its buffer to the helper at least this often while it trains
CLOSE_SECONDS = 300  # what the sweep's end waits for the helper to write the last jobs' records
_HEADER = struct.Struct("!I")
SERVE = "import sys; from pipeline.tracking.writer import serve; sys.exit(serve(sys.argv[1]))"


class WriterLost(CatnetError):
    """The helper ended while a job was handing it its record: that run fails with this reason."""


class Writer:
    """A started helper writing to the store at ``uri``."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.errors = tempfile.TemporaryFile()  # its stderr, for the reason it ended
        # in a session of its own: a terminal's Ctrl-C, sent to the sweep's process group, stops
        # the job, not this helper, which writes what it was handed (the stopped run KILLED last)
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, uri], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=self.errors, start_new_session=True)
        self.reported = False  # whether the log said that it ended

    def send(self, run_id: str, points: list[tuple[str, float, float, int]]) -> None:
        self._put(("points", run_id, points))

    def call(self, run_id: str, method: str, *args, **kwargs) -> None:
        """Have the helper call ``MlflowClient.<method>(run_id, *args, **kwargs)`` (MLflow's
        entities pickle) after what was handed over before it."""
        self._put(("call", run_id, method, args, kwargs))

    def end(self, run_id: str, status: str, reason: str | None, folder: str | None = None,
            end_time: int | None = None) -> None:
        """Hand over the run's end: once everything handed over for it is written, the helper
        sets ``status`` (FAILED, with why, if something could not be written) with the run's
        ``end_time`` (ms; when the job ended, not when its record was written: None, then) and
        removes ``folder`` (the run's private files, which it logged)."""
        self._put(("end", run_id, status, reason, folder, end_time))

    def _put(self, message: tuple) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.proc.stdin.write(_HEADER.pack(len(data)) + data)
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            raise WriterLost(self._ended()) from None

    def _ended(self) -> str:
        code = self.proc.wait()
        self.errors.seek(0)
        last = (self.errors.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        return f"the metric writer process ended (exit {code}: {last[:300]})"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """End its input; it writes what it has, then exits (killed if that takes over
        ``timeout`` seconds: the runs it did not end are then RUNNING, which the sweep closes)."""
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("tracking: the metric writer process had not written what it was handed after %.0f s; "
                      "stopped (the runs it did not end are closed FAILED)", timeout)
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
    the jobs write their records themselves from then on)."""
    for w in _STARTED:
        if w.uri != uri:
            continue
        if w.alive():
            return w
        if not w.reported:
            w.reported = True
            log.warning("tracking: %s; the sweep's jobs write their records themselves from now on",
                        w._ended())
    return None


def running() -> bool:
    """Whether this process has a helper that is still there."""
    return any(w.alive() for w in _STARTED)


def close() -> bool:
    """Close this process's helper, once it wrote what it was handed; whether there was one."""
    had = bool(_STARTED)
    while _STARTED:
        _STARTED.pop().close()
    return had


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
    """The helper's life: read what the jobs hand over, write it in order, until its input ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the job decides; its input's end ends this
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from pipeline.tracking import store

    store.import_code(uri)
    import mlflow
    from pipeline.tracking.parent import close as end_run
    from pipeline.tracking.points import write as write_points
    from pipeline.tracking.run import write_to

    client = None  # made at the first write: opening a new SQLite store creates its tables, which
    # the sweep does, before any job's run exists
    frames = _Frames(sys.stdin.fileno())
    pending: OrderedDict[str, list] = OrderedDict()  # run id -> points not yet written
    errors: dict[str, str] = {}  # run id -> why its record could not be written

    def store_client():
        nonlocal client
        if client is None:
            client = mlflow.MlflowClient(tracking_uri=uri)
        return client

    def attempt(run_id: str, write) -> None:
        if run_id in errors:  # the run fails anyway: what it handed over later is dropped
            return
        try:
            write(store_client())
        except Exception as e:  # noqa: BLE001 - said in the run, at its end
            errors[run_id] = f"{type(e).__name__}: {store.brief(e)}"

    def write_pending() -> None:
        while pending:
            run_id, points = pending.popitem(last=False)
            attempt(run_id, lambda c: write_points(c, run_id, points))

    def end(run_id: str, status: str, reason: str | None, folder: str | None, end_time: int | None) -> None:
        error = errors.pop(run_id, None)
        if error is not None:
            reason = "; ".join(filter(None, [reason, f"its record could not be written whole: {error}"]))
            status = "FAILED" if status == "FINISHED" else status
        try:
            end_run(store_client(), run_id, status, reason, end_time)
        except Exception:  # noqa: BLE001 - left RUNNING: the sweep finds it so, counts its job failed
            pass  # and closes it (pipeline/tracking/parent.py: reconcile, settle)
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

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
        elif message[0] == "call":
            _, run_id, method, args, kwargs = message
            write_pending()  # in the order the job handed them over
            attempt(run_id, lambda c: write_to(c, run_id, method, *args, **kwargs))
        elif message[0] == "end":
            write_pending()
            end(*message[1:])

