"""The record helper's clients: how a sweep's process, its jobs and joblib's workers hand a
sweep's record to the helper process that writes it (its own side: pipeline/tracking/helper.py).

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

A sweep that starts the helper also hands it the whole record (``Writer.open``): the helper imports
MLflow, opens the store and creates the parent run, while the sweep's own process goes straight to
its jobs without importing MLflow at all (about 1.5 s of a sweep). A job's run then has an id its
job chose (``create``; pipeline/tracking/points.py: create_run); a job asks the helper what it
needs to know from the store (``ask``: an identical earlier run, pipeline/tracking/reuse.py), and
the sweep's end asks it to check the jobs' runs and close the parent (pipeline/tracking/parent.py:
finish). Should the helper end, the sweep's process opens the store and writes from then on.

A joblib sweep into SQLite hands its record to the same helper: its workers' jobs reach it through
a Unix socket the helper listens on (``HELPER_ENV`` names it; ``Connected``), so neither the sweep's
process nor its workers import MLflow (about 1.5 s of a core each). A worker's job hands over its
epochs every ``tracking.flush_seconds``, as a job writing its own record does (every store
transaction takes from the cores that train), and returns once the helper has its run's end
(or a link's, or a failed job's run) in its queue, ahead of the sweep's end, which therefore
finds every job's record written, as a sequential sweep's does.

The helper runs in a session of its own and ignores Ctrl-C and SIGTERM: the job decides, and what
it handed over is still written (a stopped job's run is KILLED with it). It ends when its input
ends: the sweep closes it, or the sweep's process died. A helper that dies fails the run it was
writing for (WriterLost); the sweep's later jobs write from their own thread.

The modules' layers: store (where the record is) < points, model (how a record is written) < this
module (the helper's clients) < run, parent, reuse (what a run, a sweep, a reused job records) <
helper (the helper's process, which writes with the functions of those).
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import shutil
import struct
import subprocess
import time

from catnet.errors import CatnetError
from pipeline import early

log = logging.getLogger("catnet")
HELPER_ENV = "CATNET_RECORD_HELPER"  # for a joblib sweep's workers: the helper's socket, store and process id
SEND_SECONDS = 0.1  # a job hands its buffer to the helper at least this often while it trains
CONNECT_SECONDS = 10  # what a joblib worker waits for the sweep's helper to listen
CLOSE_SECONDS = 300  # what the sweep's end waits for the helper to write the last jobs' records
_HEADER = struct.Struct("!I")


class WriterLost(CatnetError):
    """The helper ended while a job was handing it its record: that run fails with this reason."""


class RecordError(CatnetError):
    """What the helper raised answering a question (its type and message)."""


class Writer:
    """A started helper writing to the store at ``uri``."""

    def __init__(self, uri: str, started: tuple | None = None) -> None:
        """``started``: a helper process started already (pipeline/early.py), else one now."""
        self.uri = uri
        self.proc, self.errors, self.socket = started or early.spawn(uri)
        self.replies = _Frames(self.proc.stdout.fileno())  # answers to ``ask``, and a failed ``open``
        self.reported = False  # whether the log said that it ended
        self.owns = False  # whether it opened the store and holds the sweep's record (``open``)
        self.fatal: str | None = None  # why it could not open the store, once it said so

    def open(self, experiment: str, artifact_root: str | None, parent: dict) -> None:
        """Hand it the sweep's record: it opens the store (the experiment, created if new; runs
        of dead processes closed) and creates the parent run ``parent`` (its ``id``, ``name``,
        ``tags``, ``params``, ``start``)."""
        self._put(("open", experiment, artifact_root, parent))
        self.owns = True

    def hand(self, kind: str, run_id: str, experiment: str, name: str, tags: dict[str, str], start: int,
             *record) -> None:
        """Have it create run ``run_id`` (chosen by its job) in ``experiment``: ``create`` (a job's
        run), ``link`` (a reused job's, FINISHED, with ``record``: params, metrics), ``failed`` (a
        job that failed before its run started, with ``record``: params)."""
        self._put((kind, run_id, experiment, name, tags, start, *record))

    def ask(self, *message):
        """Its answer to ``message``, once it wrote everything handed over before it; what it
        raised, as RecordError; WriterLost if it ended."""
        self._put(message)
        while True:
            try:
                reply = self._reply(block=True)
            except EOFError:
                raise WriterLost(self._ended()) from None
            if reply[0] == "fatal":
                self.fatal = reply[1]
            elif reply[0] == "error":
                raise RecordError(reply[1])
            else:
                return reply[1]

    def failed(self) -> str | None:
        """Why it could not open the store, if it said so by now (it does not wait)."""
        try:
            while self.fatal is None and (reply := self._reply(block=False)) is not None:
                if reply[0] == "fatal":
                    self.fatal = reply[1]
        except EOFError:
            pass
        return self.fatal

    def _reply(self, block: bool):
        return self.replies.next(block)

    def serve_workers(self) -> None:
        """Have a joblib sweep's workers, started from now on, hand their jobs' records to it
        (``HELPER_ENV``, which they inherit)."""
        import json

        os.environ[HELPER_ENV] = json.dumps({"socket": self.socket, "uri": self.uri, "pid": self.proc.pid})

    def send(self, run_id: str, points: list[tuple[str, float, float, int]]) -> None:
        self._put(("points", run_id, points))

    def send_every(self, flush_seconds: float) -> float:
        """How often a job hands over its buffered epochs: often (``SEND_SECONDS``), for the
        helper writes them on the core the job leaves it, as they come."""
        return min(flush_seconds, SEND_SECONDS)

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
        return f"the record helper ended (exit {code}: {last[:300]})"

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
            log.error("tracking: the record helper had not written what it was handed after %.0f s; "
                      "stopped (the runs it did not end are closed FAILED)", timeout)
            self.proc.kill()
            self.proc.wait()
        self.errors.close()
        self.proc.stdout.close()
        shutil.rmtree(os.path.dirname(self.socket), ignore_errors=True)
        os.environ.pop(HELPER_ENV, None)


class Connected(Writer):
    """The sweep's helper as a joblib worker's jobs reach it: through its socket (``HELPER_ENV``).
    What ends a job's record (its run's end, a link, a failed job's run) waits for the helper's
    word that it is in the helper's queue, ahead of anything the job's return leads to (the
    sweep's end): the helper writes it while the worker goes on, and the sweep's end finds it."""

    ACKED = ("end", "link", "failed")

    def __init__(self, uri: str, socket: str, pid: int) -> None:
        from multiprocessing.connection import Client

        self.uri, self.socket, self.pid = uri, socket, pid  # pid: for what the log says
        self.reported, self.owns, self.fatal = False, True, None
        self.closed = False
        deadline = time.monotonic() + CONNECT_SECONDS
        while True:  # a helper started a moment ago may not listen yet
            try:
                self.conn = Client(socket, family="AF_UNIX")
                return
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def hand(self, kind: str, run_id: str, *record) -> None:
        if kind == "create":  # more of the run follows, its end last
            super().hand(kind, run_id, *record)
        else:
            self.ask(kind, run_id, *record)

    def end(self, run_id: str, status: str, reason: str | None, folder: str | None = None,
            end_time: int | None = None) -> None:
        self.ask("end", run_id, status, reason, folder, end_time)

    def send_every(self, flush_seconds: float) -> float:
        """``tracking.flush_seconds``, as a job that writes its own record: the workers take
        every core, so each write the helper makes takes from training (a store transaction
        for every 0.1 s of epochs cost a 20,000-epoch job 0.3 s of the helper's time)."""
        return flush_seconds

    def _put(self, message: tuple) -> None:
        try:  # its kind readable without unpickling (_Inbox)
            self.conn.send_bytes(message[0].encode() + b"\0" + pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        except (OSError, ValueError):
            self.closed = True
            raise WriterLost(self._ended()) from None

    def _reply(self, block: bool):
        try:
            if not block and not self.conn.poll():
                return None
            return pickle.loads(self.conn.recv_bytes())
        except (OSError, EOFError):
            self.closed = True
            raise EOFError from None

    def _ended(self) -> str:
        return f"the sweep's record helper (process {self.pid}) is gone"

    def alive(self) -> bool:
        """Whether its connection is still open (a helper that ended, even one not yet reaped
        by the sweep's process, closed it): what is waiting there is a notice (``failed``)."""
        self.failed()  # reads what is waiting: its end too
        return not self.closed

    def close(self, timeout: float = 0) -> None:
        self.closed = True
        self.conn.close()


_STARTED: list[Writer] = []  # this process's helper, if a sweep started one


_LOST: list = []  # what to do once when the helper that owned the record is found ended


_EARLY: list[Writer] = []  # the helper started first thing (pipeline/early.py), until a sweep takes it


def start_early() -> None:
    """Take the helper ``python -m pipeline -m`` started first thing (pipeline/early.py), if it
    did: ``start`` hands it its store; a sweep that turns out not to use it closes it."""
    if not early.STARTED or _EARLY or _STARTED:
        return
    import atexit

    _EARLY.append(Writer("", early.STARTED.pop()))
    atexit.register(close)


def start(uri: str, on_lost=None) -> Writer:
    """Start this process's helper for the store at ``uri`` (closed when the process exits), or
    take the one started early; ``on_lost()``: called once if it owned the record (``open``)
    and is found ended."""
    if not _STARTED:
        import atexit

        if _EARLY:
            w = _EARLY.pop()
            w.uri = uri
            w._put(("uri", uri))
            _STARTED.append(w)
        else:
            _STARTED.append(Writer(uri))
        atexit.register(close)
    if on_lost is not None:
        _LOST.append(on_lost)
    return _STARTED[0]


_CONNECTED: list[Connected] = []  # in a joblib worker: its connection to the sweep's helper


def _connected(uri: str) -> Connected | None:
    """In a joblib worker of a sweep whose helper holds the record of the store at ``uri``: the
    connection to it (made once per worker); None elsewhere, or if it cannot be reached (the
    jobs then write their records themselves)."""
    import json

    spec = json.loads(os.environ.get(HELPER_ENV) or "{}")
    if spec.get("uri") != uri or _STARTED:
        return None
    for c in _CONNECTED:
        if c.socket == spec["socket"]:
            return c
    try:
        c = Connected(uri, spec["socket"], spec["pid"])
    except OSError as e:
        log.warning("tracking: the sweep's record helper could not be reached (%s); this worker's jobs "
                    "write their records themselves", e)
        os.environ.pop(HELPER_ENV, None)
        return None
    _CONNECTED[:] = [c]
    return c


def for_store(uri: str) -> Writer | None:
    """The helper started for ``uri``, if it is still there (if it ended, the log says so once:
    the jobs write their records themselves from then on); in a joblib worker, the connection
    to the sweep's helper."""
    for w in [*_STARTED, *filter(None, [_connected(uri)])]:
        if w.uri != uri:
            continue
        if w.alive():
            return w
        if not w.reported:
            w.reported = True
            log.warning("tracking: %s; the sweep's jobs write their records themselves from now on",
                        w._ended())
            if w.owns:
                lost_owner()
    return None


def lost_owner() -> None:
    """The helper that owned the record ended: this process takes the record over (once)."""
    while _LOST:
        _LOST.pop(0)()


def owner(uri: str | None = None) -> Writer | None:
    """The living helper that owns the sweep's record (of the store at ``uri``, if given; in a
    joblib worker, reached through its socket)."""
    w = for_store(uri) if uri is not None else next((w for w in _STARTED if w.alive()), None)
    return w if w is not None and w.owns else None


def running() -> bool:
    """Whether this process has a helper that is still there."""
    return any(w.alive() for w in _STARTED)


def close() -> bool:
    """Close this process's helper, once it wrote what it was handed; whether there was one."""
    had = bool(_STARTED)
    while _STARTED:
        _STARTED.pop().close()
    _LOST.clear()
    close_early()
    return had


def close_early() -> None:
    """Close the helper started early, if no sweep took it."""
    while _EARLY:
        _EARLY.pop().close()


class _Frames:
    """Length-prefixed pickles from a file descriptor, with a look at whether one is waiting."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buf, self.eof = fd, bytearray(), False

    def _read(self, block: bool) -> bytes | None:
        if not block and not select.select([self.fd], [], [], 0)[0]:
            return None
        return os.read(self.fd, 1 << 20)

    def _complete(self) -> bool:
        return len(self.buf) >= _HEADER.size and len(self.buf) >= _HEADER.size + _HEADER.unpack_from(self.buf)[0]

    def next(self, block: bool):
        """The next message; None if none is waiting (``block`` False); EOFError at the end."""
        data = self.next_bytes(block)
        return None if data is None else pickle.loads(data)

    def next_bytes(self, block: bool) -> bytes | None:
        """The next message, pickled (``next``)."""
        while not self._complete():
            if self.eof:
                raise EOFError
            chunk = self._read(block)
            if chunk is None:
                return None
            if not chunk:
                self.eof = True
                continue
            self.buf += chunk
        size = _HEADER.unpack_from(self.buf)[0]
        data = bytes(self.buf[_HEADER.size:_HEADER.size + size])
        del self.buf[:_HEADER.size + size]
        return data
