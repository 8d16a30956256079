"""The record helper process: what ``python -m pipeline -m`` starts (pipeline/early.py) to write a
sweep's record into SQLite while the jobs train. Its clients (the sweep's process, the jobs,
joblib's workers) reach it as pipeline/tracking/writer.py says; this module is the process's own
side: ``_Inbox`` reads what they hand over, ``Server`` writes it, in order, one handler per kind of
message, with the functions a process writing its own record uses (record.write_to, points,
parent, query). It sits above them all: nothing of catnet imports it; the helper's process runs
it (``early.SERVE``).
"""

from __future__ import annotations

import os
import pickle
import queue
import shutil
import signal
import sys
import threading
from collections import OrderedDict
from pathlib import Path

from pipeline.tracking import parent, points, query, store
from pipeline.tracking.record import write_to
from pipeline.tracking.writer import RecordError


class _Inbox:
    """What the helper is handed, in the order it arrives, from every connection: the sweep's
    (``owner``, whose end is the end of the input: ``END``) and each joblib worker's, accepted on
    ``socket`` (its message None when it closed). A thread per connection reads as soon as
    anything arrives (a full socket would stop the job that writes into it while the helper
    imports MLflow) and leaves the message pickled: unpickling one of MLflow's entities while the
    helper imports MLflow would import it twice over (a partial module). A kind ending in ``?``
    is answered ``ok`` at once: the message is in the queue (writer.py)."""

    END = ("end of input",)

    def __init__(self, owner, socket: str) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.owner = owner
        threading.Thread(target=self._receive, args=(owner,), name="catnet-sweep", daemon=True).start()
        if socket:
            from multiprocessing.connection import Listener

            listener = Listener(socket, family="AF_UNIX")  # before the imports: workers may connect early
            threading.Thread(target=self._listen, args=(listener,), name="catnet-listen", daemon=True).start()

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
            if kind.endswith(b"?"):  # in the queue: handled before anything the job's return leads to
                self.reply(conn, ("ok", None))

    def reply(self, conn, message: tuple) -> None:
        """Send ``message`` to a connection (from this thread or the helper's loop)."""
        with self.lock:
            try:
                conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
            except (OSError, ValueError):  # the client is gone: what it handed over is still written
                pass

    def next(self, block: bool):
        """(source, message), or None if nothing is waiting (``block`` False); the message is
        ``END`` at the end of the sweep's connection, None when a worker's closed."""
        try:
            source, data = self.queue.get(block=block)
        except queue.Empty:
            return None
        if data is None:
            return source, self.END if source is self.owner else None
        return source, pickle.loads(data)


class Server:
    """The helper's state and its handlers: ``on_<kind>(*fields)`` for each kind of message."""

    QUESTIONS = ("find", "finish", "abort")  # answered once everything before them is written

    def __init__(self, uri: str, inbox: _Inbox) -> None:
        self.uri, self.inbox = uri, inbox
        self.client = None  # made at the first write, or by ``open``: opening a new SQLite store creates
        # its tables, which the sweep does, or hands to this helper, before any job's run exists
        self.pending: OrderedDict[str, list] = OrderedDict()  # run id -> points not yet written
        self.batches: dict[str, dict] = {}  # run id -> params, metrics and tags not yet written: one write at its end
        self.errors: dict[str, str] = {}  # run id -> why its record could not be written
        self.experiments: dict[str, str] = {}  # name -> id, of the experiments it opened
        self.fatal: str | None = None  # why ``open`` failed: every run's record fails with it
        self.root: str | None = None  # the artifact root ``open`` named, for experiments it creates
        self.opened = False  # whether the sweep said which record this is (``open``)
        self.held: list = []  # what workers handed over before that, in the order it came
        self.told: set = set()  # the workers' connections told that the store could not be opened
        self.source = None  # the connection the message being handled came from

    def serve(self) -> None:
        """Handle what comes, in order, until the sweep's connection ends; then write what is
        left and exit."""
        while True:
            item = self.held.pop(0) if self.opened and self.held else self.inbox.next(block=not self.pending)
            if item is None:  # nothing more waiting: write the points that came
                self.write_pending()
                continue
            source, message = item
            if message is _Inbox.END:
                self.write_pending()
                self.write_batches()
                return
            if message is None:  # a worker's connection closed
                continue
            if source is not self.inbox.owner and not self.opened:
                self.held.append(item)
                continue
            if source is not self.inbox.owner and self.fatal and source not in self.told:
                self.told.add(source)  # its next job fails at once (Helper.failed)
                self.inbox.reply(source, ("fatal", self.fatal))
            self.source = source
            kind, *fields = message
            if kind not in ("points", "uri"):
                self.write_pending()  # what came before, in the order it was handed over
            if kind in self.QUESTIONS:
                self.write_batches()
            getattr(self, f"on_{kind}")(*fields)

    # ---- the store ----

    def store_client(self):
        if self.client is None:
            if not self.uri:
                raise RecordError("the helper was not told its store")
            import mlflow

            mlflow.set_tracking_uri(self.uri)  # the parent's model is logged through the fluent API
            mlflow.set_registry_uri(self.uri)
            self.client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self.client

    def experiment(self, name: str) -> str:
        if self.fatal:
            raise RecordError(self.fatal)
        if name not in self.experiments:
            client = self.store_client()
            self.experiments[name] = store.ensure_experiment(client, name, Path(self.root) if self.root else None)
            store.close_orphans(client, self.experiments[name])
        return self.experiments[name]

    def attempt(self, run_id: str, write) -> None:
        """``write(client)`` for run ``run_id``, unless its record failed already; what fails is
        said in the run, at its end."""
        if run_id in self.errors:  # the run fails anyway: what it handed over later is dropped
            return
        try:
            write(self.store_client())
        except Exception as e:  # noqa: BLE001 - said in the run, at its end
            self.errors[run_id] = f"{type(e).__name__}: {store.brief(e)}"

    def write_pending(self) -> None:
        while self.pending:
            run_id, points_ = self.pending.popitem(last=False)
            self.attempt(run_id, lambda c: points.write(c, run_id, points_))

    def write_batches(self, run_id: str | None = None) -> None:
        for rid in [run_id] if run_id is not None else list(self.batches):
            batch = self.batches.pop(rid, None)
            if batch is not None:
                self.attempt(rid, lambda c: write_to(c, rid, "batch", batch))

    def answer(self, ask) -> None:
        try:
            self.inbox.reply(self.source, ("ok", ask(self.store_client())))
        except Exception as e:  # noqa: BLE001 - raised in the asking process
            self.inbox.reply(self.source, ("error", f"{type(e).__name__}: {store.brief(e)}"))

    # ---- the handlers ----

    def on_uri(self, uri: str) -> None:
        self.uri = uri
        store.import_code(uri)  # a server's client code, if it is one

    def on_open(self, experiment: str, artifact_root: str | None, top: dict) -> None:
        self.opened, self.root = True, artifact_root
        try:
            self.experiment(experiment)
        except Exception as e:  # noqa: BLE001 - the jobs are told (Helper.failed), and the sweep's end
            self.fatal = f"the tracking store could not be opened: {store.brief(e)}"
            self.inbox.reply(self.source, ("fatal", self.fatal))
        self.on_create(top["id"], experiment, top["name"], top["tags"], top["start"])
        self.attempt(top["id"], lambda c: write_to(c, top["id"], "params", top["params"]))

    def on_create(self, run_id: str, experiment: str, name: str, tags: dict, start: int) -> None:
        self.attempt(run_id, lambda c: points.create_run(c, run_id, self.experiment(experiment), name, tags, start))

    def on_points(self, run_id: str, points_: list) -> None:
        self.pending.setdefault(run_id, []).extend(points_)

    def on_call(self, run_id: str, kind: str, args: tuple) -> None:
        if kind in ("params", "metrics", "tags"):  # kept for one write at the run's end
            batch = self.batches.setdefault(run_id, {"params": {}, "metrics": [], "tags": {}})
            if kind == "metrics":
                batch["metrics"] += [(k, v, args[1]) for k, v in args[0].items()]
            else:
                batch[kind].update(args[0])
        else:
            self.attempt(run_id, lambda c: write_to(c, run_id, kind, *args))

    def on_end(self, run_id: str, status: str, reason: str | None, folder: str | None, end_time: int | None) -> None:
        self.write_batches(run_id)
        error = self.errors.pop(run_id, None)
        if error is not None:
            reason = "; ".join(filter(None, [reason, f"its record could not be written whole: {error}"]))
            status = "FAILED" if status == "FINISHED" else status
        try:
            parent.close(self.store_client(), run_id, status, reason, end_time)
        except Exception:  # noqa: BLE001 - left RUNNING: the sweep finds it so, counts its job failed
            pass  # and closes it (pipeline/tracking/parent.py: reconcile, settle)
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    def on_find(self, experiment: str, key: str) -> None:
        self.answer(lambda c: query.identical(c, self.experiment(experiment), key))

    def on_finish(self, parent_id: str, outcomes: list, order: list, direction: str) -> None:
        if self.fatal:
            self.inbox.reply(self.source, ("error", self.fatal))
        else:
            self.answer(lambda c: parent.finish(c, parent_id, outcomes, order, direction, helped=True))

    def on_abort(self, parent_id: str, status: str, reason: str) -> None:
        self.answer(lambda c: parent.abort(c, parent_id, status, reason))


def serve(uri: str, socket: str, fd: int) -> int:
    """The helper's life: read what the jobs hand over, write it in order, until the sweep's
    connection (the socket pair's end ``fd``) ends. ``uri`` empty: started early
    (writer.start_early), it learns its store from its first message. ``socket``: where it
    listens for joblib workers' jobs."""
    from multiprocessing.connection import Connection

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the job decides; the sweep's connection's end ends this
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    inbox = _Inbox(Connection(fd), socket)  # read from the start: the jobs do not wait for the imports
    store.import_code(uri)
    import mlflow  # noqa: F401 - before anything is written

    Server(uri, inbox).serve()
    if socket:
        shutil.rmtree(os.path.dirname(socket), ignore_errors=True)
    sys.stderr.flush()
    os._exit(0)  # all is written: no interpreter teardown (MLflow's modules) for the sweep to wait for
