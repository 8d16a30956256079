"""The record helper process: what ``python -m pipeline -m`` starts (pipeline/early.py) to write a
sweep's record into SQLite while the jobs train. Its clients (the sweep's process, the jobs, joblib's
workers) are in pipeline/tracking/writer.py; this module is the process's own side: ``serve`` reads
what they hand over (``_Inbox``) and writes it, in order, with the functions a job writing its own
record uses (pipeline/tracking/run.py: write_to; parent.py, reuse.py, points.py). It sits above
them all: nothing of catnet imports it; the helper's process runs it (``early.SERVE``).
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

from pipeline.tracking import parent, points, reuse, store
from pipeline.tracking.run import write_to
from pipeline.tracking.writer import _HEADER, Connected, RecordError, _Frames


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
    store.import_code(uri)
    import mlflow

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
            experiments[name] = store.ensure_experiment(store_client(), name, root)
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
