"""The record helper as its clients reach it: how a sweep's process, its jobs and joblib's workers
hand a sweep's record to the helper process that writes it (the helper's own side:
pipeline/tracking/helper.py; what a run records through it: pipeline/tracking/record.py: Handed).

Writing a run's 1,000 epoch points costs MLflow's SQL store about as long as training the
default network (its ORM, in Python). A thread of the job's process cannot overlap the two: both
need the interpreter's lock. So a sweep whose jobs run in its own process (Hydra's basic launcher)
or in joblib's workers, into a SQLite store, has a helper process hold its record: it imports
MLflow, opens the store and creates the parent run (``Helper.open``), while the sweep's own
process and its workers never import MLflow (about 1.5 s of a core each). Each job hands it what
its run records, in order (its epochs every ``send_seconds`` while it trains, its params, files,
final metrics and tags, its end last), and does not wait: the next job starts while the helper
writes. A question (an identical earlier run, the sweep's end) is answered once everything handed
over before it is written (``ask``).

One transport: a connection of ``multiprocessing.connection`` over a Unix socket. The sweep's
process holds one end of the socket pair the helper was started with (pipeline/early.py: spawn);
a joblib worker connects to the socket the helper listens on (``HELPER_ENV`` names it). A message
is its kind, a zero byte and a pickle, so the helper reads the kind without unpickling; a kind
ending in ``?`` is answered ``ok`` as soon as it is in the helper's queue: a worker's job's last
word (its run's end) is then ahead of the sweep's end, which comes through another connection.

The helper ignores Ctrl-C and SIGTERM (the job decides; what it handed over is still written) and
ends when the sweep's end of the pair closes: the sweep closed it, or the sweep's process died. A
helper that ends fails the run it was writing for (``WriterLost``); the sweep's later jobs write
their own records (record.Direct), and the sweep's process takes over the parent run.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import time
from typing import Callable

from catnet.errors import CatnetError
from pipeline import early

log = logging.getLogger("catnet")
HELPER_ENV = "CATNET_RECORD_HELPER"  # for a joblib sweep's workers: the helper's socket, store and process id
SEND_SECONDS = 0.1  # a job of the sweep's process hands over its epochs at least this often while it trains
CONNECT_SECONDS = 10  # what a joblib worker waits for the sweep's helper to listen
CLOSE_SECONDS = 300  # what the sweep's end waits for the helper to write the last jobs' records


class WriterLost(CatnetError):
    """The helper ended while a job was handing it its record: that run fails with this reason."""


class RecordError(CatnetError):
    """What the helper raised answering a question (its type and message)."""


def message(kind: str, *fields) -> bytes:
    """A message as it travels: its kind, a zero byte, the pickled (kind, *fields)."""
    return kind.encode() + b"\0" + pickle.dumps((kind.rstrip("?"), *fields), protocol=pickle.HIGHEST_PROTOCOL)


class Helper:
    """The record helper as this process reaches it, through ``conn``. The sweep's process
    started it (``proc``, whose stderr went to ``errors``); a joblib worker connected to it
    (``pid``: for what the log says), and waits for the helper's ``ok`` on its jobs' last words."""

    def __init__(self, uri: str, conn, *, proc: subprocess.Popen | None = None, errors=None,
                 socket: str = "", pid: int | None = None) -> None:
        self.uri, self.conn, self.proc, self.errors, self.socket = uri, conn, proc, errors, socket
        self.pid = proc.pid if proc is not None else pid
        self.worker = proc is None
        # a worker's jobs hand over at tracking.flush_seconds, as a job writing its own record does:
        # the workers take every core, so each write the helper makes takes from training
        self.send_seconds = float("inf") if self.worker else SEND_SECONDS
        self.fatal: str | None = None  # why it could not open the store, once it said so
        self.closed = False
        self.reported = False  # whether the log said that it ended

    @classmethod
    def start(cls, uri: str, started: tuple | None = None) -> "Helper":
        """A helper for the store at ``uri``: ``started`` (pipeline/early.py), else one started now."""
        from multiprocessing.connection import Connection

        proc, errors, socket, ours = started or early.spawn(uri)
        return cls(uri, Connection(ours.detach()), proc=proc, errors=errors, socket=socket)

    @classmethod
    def connect(cls, uri: str, socket: str, pid: int) -> "Helper":
        """A joblib worker's connection to the sweep's helper (which may not listen yet)."""
        from multiprocessing.connection import Client

        deadline = time.monotonic() + CONNECT_SECONDS
        while True:
            try:
                return cls(uri, Client(socket, family="AF_UNIX"), socket=socket, pid=pid)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    # ---- what it is handed ----

    def tell_store(self, uri: str) -> None:
        """A helper started early learns its store."""
        self.uri = uri
        self._put("uri", uri)

    def open(self, experiment: str, artifact_root: str | None, parent: dict) -> None:
        """Hand it the sweep's record: it opens the store (the experiment, created if new; runs
        of dead processes closed) and creates the parent run ``parent`` (its ``id``, ``name``,
        ``tags``, ``params``, ``start``: parent.describe)."""
        self._put("open", experiment, artifact_root, parent)

    def create(self, run_id: str, experiment: str, name: str, tags: dict[str, str], start: int) -> None:
        """Have it create run ``run_id`` (its job chose the id) in ``experiment``."""
        self._put("create", run_id, experiment, name, tags, start)

    def call(self, run_id: str, kind: str, *args) -> None:
        """Have it write ``kind`` of the run's record (record.write_to) after what came before."""
        self._put("call", run_id, kind, args)

    def send(self, run_id: str, points: list[tuple[str, float, float, int]]) -> None:
        self._put("points", run_id, points)

    def end(self, run_id: str, status: str, reason: str | None, folder: str | None = None,
            end_time: int | None = None) -> None:
        """Hand over the run's end: once everything handed over for it is written, the helper
        sets ``status`` (FAILED, with why, if something could not be written) with the run's
        ``end_time`` (ms: when the job ended, not when its record was written) and removes
        ``folder`` (the run's private files, which it logged)."""
        if self.worker:  # in its queue before the job returns: ahead of the sweep's end
            self.ask("end?", run_id, status, reason, folder, end_time)
        else:
            self._put("end", run_id, status, reason, folder, end_time)

    def ask(self, kind: str, *fields):
        """Its answer to ``kind`` (find, finish, abort), once it wrote everything handed over
        before; what it raised, as RecordError; WriterLost if it ended."""
        self._put(kind, *fields)
        while True:
            reply = self._reply(block=True)
            if reply is None:
                raise WriterLost(self._ended())
            if reply[0] == "fatal":
                self.fatal = reply[1]
            elif reply[0] == "error":
                raise RecordError(reply[1])
            else:
                return reply[1]

    def failed(self) -> str | None:
        """Why it could not open the store, if it said so by now (it does not wait)."""
        while self.fatal is None and (reply := self._reply(block=False)) not in (None, False):
            if reply[0] == "fatal":
                self.fatal = reply[1]
        return self.fatal

    def alive(self) -> bool:
        """Whether it is still there (a helper that ended closed its connections)."""
        if self.proc is not None:
            return self.proc.poll() is None
        self.failed()  # reads what is waiting: its end too
        return not self.closed

    def serve_workers(self) -> None:
        """Have a joblib sweep's workers, started from now on, hand their jobs' records to it
        (``HELPER_ENV``, which they inherit)."""
        os.environ[HELPER_ENV] = json.dumps({"socket": self.socket, "uri": self.uri, "pid": self.pid})

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """End the connection. The sweep's: the helper writes what it has, then exits (killed
        if that takes over ``timeout`` seconds: the runs it did not end stay RUNNING, which the
        sweep closes)."""
        self.closed = True
        self.conn.close()
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("tracking: the record helper had not written what it was handed after %.0f s; "
                      "stopped (the runs it did not end are closed FAILED)", timeout)
            self.proc.kill()
            self.proc.wait()
        self.errors.close()
        shutil.rmtree(os.path.dirname(self.socket), ignore_errors=True)
        os.environ.pop(HELPER_ENV, None)

    # ---- the transport ----

    def _put(self, kind: str, *fields) -> None:
        try:
            self.conn.send_bytes(message(kind, *fields))
        except (OSError, ValueError):
            self.closed = True
            raise WriterLost(self._ended()) from None

    def _reply(self, block: bool):
        """The next reply; False if none is waiting (``block`` False); None once the helper ended."""
        try:
            if not block and not self.conn.poll():
                return False
            return pickle.loads(self.conn.recv_bytes())
        except (OSError, EOFError):
            self.closed = True
            return None

    def _ended(self) -> str:
        if self.proc is None:
            return f"the sweep's record helper (process {self.pid}) is gone"
        try:
            code = self.proc.wait(timeout=CONNECT_SECONDS)
        except subprocess.TimeoutExpired:  # this process closed the connection: the helper is finishing
            return f"the record helper (process {self.pid}) was closed"
        if self.errors.closed:
            return f"the record helper ended (exit {code})"
        self.errors.seek(0)
        last = (self.errors.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
        return f"the record helper ended (exit {code}: {last[:300]})"

    def __reduce__(self):
        raise TypeError("a record helper's connection belongs to its process (a copy elsewhere would keep "
                        "the helper from seeing the sweep's end)")


class _Here:
    """This process's record helper: the one started first thing (pipeline/early.py) until a
    sweep takes it, the one its sweep started, or (in a joblib worker) its connection to the
    sweep's; and what to do, once, when the helper is found ended."""

    def __init__(self) -> None:
        self.early: Helper | None = None
        self.started: Helper | None = None
        self.connected: Helper | None = None
        self.on_lost: list[Callable[[], None]] = []


_HERE = _Here()


def start_early() -> None:
    """Take the helper ``python -m pipeline -m`` started first thing (pipeline/early.py), if it
    did: ``start`` hands it its store; a sweep that turns out not to use it closes it."""
    if early.STARTED and _HERE.early is None and _HERE.started is None:
        import atexit

        _HERE.early = Helper.start("", early.STARTED.pop())
        atexit.register(close)


def start(uri: str) -> Helper:
    """Start this process's helper for the store at ``uri`` (closed when the process exits), or
    take the one started early."""
    if _HERE.started is None:
        import atexit

        if _HERE.early is not None:
            _HERE.started, _HERE.early = _HERE.early, None
            _HERE.started.tell_store(uri)
        else:
            _HERE.started = Helper.start(uri)
        atexit.register(close)
    return _HERE.started


def when_lost(do: Callable[[], None]) -> None:
    """Call ``do()`` once when this process finds its helper ended (it takes the record over)."""
    _HERE.on_lost.append(do)


def _connected(uri: str) -> Helper | None:
    """In a joblib worker of a sweep whose helper holds the record of the store at ``uri``: the
    connection to it (made once per worker); None elsewhere, or if it cannot be reached (the
    jobs then write their records themselves)."""
    spec = json.loads(os.environ.get(HELPER_ENV) or "{}")
    if spec.get("uri") != uri or _HERE.started is not None:
        return None
    if _HERE.connected is not None and _HERE.connected.socket == spec["socket"]:
        return _HERE.connected
    try:
        _HERE.connected = Helper.connect(uri, spec["socket"], spec["pid"])
    except OSError as e:
        log.warning("tracking: the sweep's record helper could not be reached (%s); this worker's jobs "
                    "write their records themselves", e)
        os.environ.pop(HELPER_ENV, None)
        return None
    return _HERE.connected


def for_store(uri: str) -> Helper | None:
    """The helper that holds the record of the store at ``uri`` for this process, if it is
    still there (if it ended, the log says so once, and this process takes the record over:
    ``when_lost``); in a joblib worker, the connection to the sweep's helper."""
    helper = _HERE.started if _HERE.started is not None else _connected(uri)
    if helper is None or helper.uri != uri:
        return None
    if helper.alive():
        return helper
    if not helper.reported:
        helper.reported = True
        log.warning("tracking: %s; the sweep's jobs write their records themselves from now on", helper._ended())
        lost()
    return None


def lost() -> None:
    """The helper that held the record ended: this process takes the record over (once)."""
    while _HERE.on_lost:
        _HERE.on_lost.pop(0)()


def running() -> bool:
    """Whether this process started a helper that is still there."""
    return _HERE.started is not None and _HERE.started.alive()


def close() -> bool:
    """Close this process's helper, once it wrote what it was handed; whether there was one."""
    had = _HERE.started is not None
    if had:
        helper, _HERE.started = _HERE.started, None
        helper.close()
    _HERE.on_lost.clear()
    close_early()
    return had


def close_early() -> None:
    """Close the helper started early, if no sweep took it."""
    if _HERE.early is not None:
        helper, _HERE.early = _HERE.early, None
        helper.close()
