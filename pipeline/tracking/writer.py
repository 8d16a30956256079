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
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict

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


# ---- the helper's side -----------------------------------------------------------------------------

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


class _Inbox:
    """What the helper is handed, in the order it arrives: the messages of the sweep's process
    (its input; source None) and of each joblib worker's connection (source: the connection;
    its message None when it closed). Threads read both as soon as anything arrives (a full
    pipe or socket would stop the job that writes into it while the helper imports MLflow);
    the end of the input is ``END``. They leave the messages pickled: unpickling one of MLflow's
    entities while the helper imports MLflow would import it twice over (a partial module). A
    worker's message comes as its kind, a zero byte, then the pickle (``Connected``)."""

    END = ("end of input",)

    def __init__(self, fd: int, socket: str) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        threading.Thread(target=self._input, args=(fd,), name="catnet-input", daemon=True).start()
        if socket:
            from multiprocessing.connection import Listener

            listener = Listener(socket, family="AF_UNIX")  # before the imports: workers may connect early
            threading.Thread(target=self._listen, args=(listener,), name="catnet-listen", daemon=True).start()

    def _input(self, fd: int) -> None:
        frames = _Frames(fd)
        while True:
            try:
                self.queue.put((None, frames.next_bytes(block=True)))
            except EOFError:
                self.queue.put((None, None))
                return

    def _listen(self, listener) -> None:
        while True:
            try:
                conn = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._receive, args=(conn,), name="catnet-worker", daemon=True).start()

    def _receive(self, conn) -> None:
        while True:
            try:
                kind, _, data = conn.recv_bytes().partition(b"\0")
            except (EOFError, OSError):
                self.queue.put((conn, None))
                return
            self.queue.put((conn, data))
            if kind.decode() in Connected.ACKED:  # in the queue: handled before anything the job's return leads to
                self.reply(conn, ("ok", None))

    def reply(self, conn, message: tuple) -> None:
        """Send ``message`` to a worker's connection (from this thread or the helper's loop)."""
        with self.lock:
            try:
                conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
            except (OSError, ValueError):  # the worker is gone: what it handed over is still written
                pass

    def next(self, block: bool):
        """(source, message), or None if nothing is waiting (``block`` False); the message is
        ``END`` at the end of the input, None when a worker's connection closed."""
        try:
            source, data = self.queue.get(block=block)
        except queue.Empty:
            return None
        if data is None:
            return source, self.END if source is None else None
        return source, pickle.loads(data)


def serve(uri: str, socket: str = "") -> int:
    """The helper's life: read what the jobs hand over, write it in order, until its input ends.
    ``uri`` empty: started early (``start_early``), it learns its store from its first message.
    ``socket``: where it listens for joblib workers' jobs (``Connected``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the job decides; its input's end ends this
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    inbox = _Inbox(sys.stdin.fileno(), socket)  # read from the start: the jobs do not wait for the imports
    from pipeline.tracking import store

    store.import_code(uri)
    import mlflow
    from pipeline.tracking import parent, points, reuse
    from pipeline.tracking.run import write_to

    client = None  # made at the first write, or by ``open``: opening a new SQLite store creates
    # its tables, which the sweep does, or hands to this helper, before any job's run exists
    out = sys.stdout.buffer
    pending: OrderedDict[str, list] = OrderedDict()  # run id -> points not yet written
    errors: dict[str, str] = {}  # run id -> why its record could not be written
    experiments: dict[str, str] = {}  # name -> id, of the experiments it opened
    fatal: list[str] = []  # why ``open`` failed: every run's record fails with it
    roots: list[str] = []  # the artifact root ``open`` named, for experiments it creates

    source = None  # where the message being handled came from: None (the sweep's process) or a connection

    def reply(*message) -> None:
        if source is not None:
            inbox.reply(source, message)
            return
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            out.write(_HEADER.pack(len(data)) + data)
            out.flush()
        except (BrokenPipeError, OSError):  # the sweep's process is gone: what it handed over is still written
            pass

    def store_client():
        nonlocal client
        if client is None:
            if not uri:
                raise RecordError("the helper was not told its store")
            mlflow.set_tracking_uri(uri)  # the parent's model is logged through the fluent API
            mlflow.set_registry_uri(uri)
            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        return client

    def experiment(name: str) -> str:
        if fatal:
            raise RecordError(fatal[0])
        if name not in experiments:
            from pathlib import Path

            root = Path(roots[0]) if roots and roots[0] else None
            experiments[name] = store._experiment_id(store_client(), name, root)
            store.close_orphans(store_client(), experiments[name])
        return experiments[name]

    def attempt(run_id: str, write) -> None:
        if run_id in errors:  # the run fails anyway: what it handed over later is dropped
            return
        try:
            write(store_client())
        except Exception as e:  # noqa: BLE001 - said in the run, at its end
            errors[run_id] = f"{type(e).__name__}: {store.brief(e)}"

    def write_pending() -> None:
        while pending:
            run_id, points_ = pending.popitem(last=False)
            attempt(run_id, lambda c: points.write(c, run_id, points_))

    batches: dict[str, dict] = {}  # run id -> its params, metrics and tags not yet written: one write at its end

    def keep(run_id: str, method: str, *args) -> None:
        batch = batches.setdefault(run_id, {"params": {}, "metrics": [], "tags": {}})
        if method == "metrics":
            batch["metrics"] += [(k, v, args[1]) for k, v in args[0].items()]
        else:
            batch[method].update(args[0])

    def write_batches(run_id: str | None = None) -> None:
        for rid in [run_id] if run_id is not None else list(batches):
            batch = batches.pop(rid, None)
            if batch is not None:
                attempt(rid, lambda c: write_to(c, rid, "batch", batch))

    def end(run_id: str, status: str, reason: str | None, folder: str | None, end_time: int | None) -> None:
        error = errors.pop(run_id, None)
        if error is not None:
            reason = "; ".join(filter(None, [reason, f"its record could not be written whole: {error}"]))
            status = "FAILED" if status == "FINISHED" else status
        try:
            parent.close(store_client(), run_id, status, reason, end_time)
        except Exception:  # noqa: BLE001 - left RUNNING: the sweep finds it so, counts its job failed
            pass  # and closes it (pipeline/tracking/parent.py: reconcile, settle)
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    def create(run_id: str, name: str, tags: dict, start: int, experiment_name: str,
               params: dict | None = None, metrics: dict | None = None, status: str | None = None) -> None:
        """A run its job (or the sweep) chose the id of; ``status``: ended at once."""
        def write(c) -> None:
            points.create_run(c, run_id, experiment(experiment_name), name, tags, start)
            if params:
                write_to(c, run_id, "params", params)
            if metrics:
                write_to(c, run_id, "metrics", metrics, 0)  # a link's metrics at time 0, as reuse.link writes them
            if status:
                c.set_terminated(run_id, status)
        attempt(run_id, write)

    def answer(ask) -> None:
        try:
            reply("ok", ask(store_client()))
        except Exception as e:  # noqa: BLE001 - raised in the asking process
            reply("error", f"{type(e).__name__}: {store.brief(e)}")

    opened = False  # whether the sweep's process said which record this is (``open``)
    told: set = set()  # the workers' connections told that the store could not be opened
    before_open: list = []  # what workers handed over before that (in the order it came)
    while True:
        item = before_open.pop(0) if opened and before_open else inbox.next(block=not pending)
        if item is None:  # nothing more waiting: write what came
            write_pending()
            continue
        source, message = item
        if message is _Inbox.END:
            write_pending()
            write_batches()
            sys.stdout.flush()
            sys.stderr.flush()
            if socket:
                shutil.rmtree(os.path.dirname(socket), ignore_errors=True)
            os._exit(0)  # all is written: no interpreter teardown (MLflow's modules) for the sweep to wait for
        if message is None:  # a worker's connection closed
            continue
        if source is not None and not opened:
            before_open.append(item)
            continue
        if source is not None and fatal and source not in told:  # its next job fails at once (Writer.failed)
            told.add(source)
            reply("fatal", fatal[0])
        kind = message[0]
        if kind == "uri":
            uri = message[1]
            store.import_code(uri)  # a server's client code, if it is one
            continue
        if kind == "points":
            pending.setdefault(message[1], []).extend(message[2])
            continue
        write_pending()  # what came before, in the order it was handed over
        if kind == "call":
            _, run_id, method, args, kwargs = message
            if method in ("params", "metrics", "tags") and not kwargs:
                keep(run_id, method, *args)
            else:
                attempt(run_id, lambda c: write_to(c, run_id, method, *args, **kwargs))
            continue
        if kind == "end":
            write_batches(message[1])
            end(*message[1:])
            continue
        if kind in ("find", "finish", "abort"):  # a question or the sweep's end: everything before it written
            write_batches()
        if kind == "open":
            opened = True
            _, name, artifact_root, top = message
            roots.append(artifact_root)
            try:
                experiment(name)
            except Exception as e:  # noqa: BLE001 - the jobs are told (Writer.failed), and the sweep's end
                fatal.append(f"the tracking store could not be opened: {store.brief(e)}")
                reply("fatal", fatal[0])
            create(top["id"], top["name"], top["tags"], top["start"], name, params=top["params"])
        elif kind == "create":
            _, run_id, experiment_name, name_, tags, start = message
            create(run_id, name_, tags, start, experiment_name)
        elif kind == "link":  # a reused job's run, FINISHED at once
            _, run_id, experiment_name, name_, tags, start, params, metrics = message
            create(run_id, name_, tags, start, experiment_name, params, metrics, "FINISHED")
        elif kind == "failed":  # a job that failed before its run started
            _, run_id, experiment_name, name_, tags, start, params = message
            create(run_id, name_, tags, start, experiment_name, params, status="FAILED")
        elif kind == "find":
            _, experiment_name, key = message
            answer(lambda c: reuse.search(c, experiment(experiment_name), key))
        elif kind == "finish":
            _, parent_id, outcomes, order, direction = message
            if fatal:
                reply("error", fatal[0])
            else:
                answer(lambda c: parent.finish(c, parent_id, outcomes, order, direction, helped=True))
        elif kind == "abort":
            _, parent_id, status, reason = message
            answer(lambda c: parent.abort(c, parent_id, status, reason))
