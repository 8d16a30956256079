"""A sweep's parent run: opened before any job starts, closed with the job counts and the best
child (by the one ranking rule, query.rank), or KILLED with its running children.

``sweep_record`` chooses, once when the sweep opens, who writes it: this process (``Here``) or
the record helper that holds the sweep's record (``Helped``, pipeline/tracking/writer.py), which
hands it back to ``Here`` if it ends. The sweep (pipeline/sweep.py) only calls ``open``,
``finish`` and ``abort``."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from omegaconf import DictConfig

from catnet.metrics import HEADLINE
from pipeline.tracking import model, names, query, reuse, store, writer
from pipeline.tracking.record import write_to

log = logging.getLogger("catnet")


def describe(name: str, description: str, params: dict[str, str]) -> dict:
    """A sweep's parent run as ``open_parent`` and the sweep's helper (pipeline/tracking/writer.py:
    Helper.open) create it: an id chosen now, its name, tags (``description`` as its note), params
    and start (ms)."""
    import time
    import uuid

    return {"id": uuid.uuid4().hex, "name": name[:250], "start": int(time.time() * 1000),
            "tags": {"catnet.sweep": "parent", "mlflow.source.name": "pipeline -m",
                     "mlflow.note.content": description[:5000],
                     **names.provenance_tags(), **store.process_tags()},
            "params": {k: str(v)[:6000] for k, v in params.items()}}


def open_parent(config: DictConfig, parent: dict) -> Any:
    """The client of the configured store, where the RUNNING parent run ``parent``
    (``describe``) now exists in the configured experiment (made now, unless it is there). A
    server chooses the run's id itself: ``parent["id"]`` becomes its."""
    from pipeline.tracking import points

    client, experiment_id = store.open_store(config)  # first: it imports MLflow (store.import_code)
    if not points.sql_store(client):
        parent["id"] = client.create_run(experiment_id, start_time=parent["start"], tags=parent["tags"],
                                         run_name=parent["name"]).info.run_id
        write_to(client, parent["id"], "params", parent["params"])
    elif points.create_run(client, parent["id"], experiment_id, parent["name"], parent["tags"], parent["start"]):
        write_to(client, parent["id"], "params", parent["params"])
    return client


class Here:
    """The sweep's parent run written by this process. ``helped``: a helper wrote the jobs'
    records (``finish``); ``before()``: what to wait for before the end (a server's return)."""

    def __init__(self, config: DictConfig, parent: dict, helped: bool = False, before: Callable | None = None):
        self.config, self.parent, self.helped, self.before = config, parent, helped, before
        self.client = None

    def open(self) -> None:
        """The store opened and the parent run made, unless it is there (``open_parent``)."""
        if self.client is None:
            self.client = open_parent(self.config, self.parent)

    def finish(self, outcomes: list[dict], order: Sequence[str], direction: str) -> dict:
        try:
            self.open()
        except Exception as e:  # noqa: BLE001 - the store cannot even be opened
            return unchecked(outcomes, f"the tracking store could not be opened: {store.brief(e)}", self.parent["id"])
        return finish(self.client, self.parent["id"], outcomes, order, direction, self.helped, before=self.before)

    def abort(self, status: str, reason: str) -> None:
        self.open()
        abort(self.client, self.parent["id"], status, reason)


class Helped:
    """The sweep's parent run written by the record helper that holds the sweep's record; if it
    ends, this process takes the parent over (``Here``: made if the helper had not made it)."""

    def __init__(self, helper: writer.Helper, config: DictConfig, parent: dict, before: Callable | None = None):
        self.helper, self.config, self.parent = helper, config, parent
        self.here = Here(config, parent, helped=True, before=before)
        writer.when_lost(self._take_over)

    def open(self) -> None:
        root = store.store_uri(self.config)[1]
        self.helper.open(self.config.tracking.experiment, str(root) if root else None, self.parent)

    def finish(self, outcomes: list[dict], order: Sequence[str], direction: str) -> dict:
        """Once the helper wrote what the last jobs handed over and ended their runs."""
        try:
            return self.helper.ask("finish", self.parent["id"], outcomes, order, direction)
        except writer.RecordError as e:  # the store could not be opened, or the end not written
            return unchecked(outcomes, str(e), self.parent["id"])
        except writer.WriterLost:
            writer.close()
            return self.here.finish(outcomes, order, direction)

    def abort(self, status: str, reason: str) -> None:
        """Once the helper wrote what the jobs handed over (a finished job's run stays FINISHED)."""
        try:
            self.helper.ask("abort", self.parent["id"], status, reason)
        except (writer.WriterLost, writer.RecordError):
            writer.close()
            self.here.abort(status, reason)

    def _take_over(self) -> None:
        try:
            self.here.open()
        except Exception as e:  # noqa: BLE001 - the sweep's end says what could not be recorded
            log.error("tracking: the sweep's parent run %s could not be made here: %s", self.parent["id"], e)


def sweep_record(config: DictConfig, parent: dict, before: Callable | None = None) -> Here | Helped:
    """Who writes the sweep's parent run ``parent`` (``describe``): the helper this process
    started for the configured store, if it has one, else this process."""
    helper = writer.for_store(store.store_uri(config)[0])
    return Helped(helper, config, parent, before) if helper is not None else Here(config, parent, before=before)


def close(client, run_id: str, status: str, reason: str | None, end_time: int | None = None) -> None:
    """End run ``run_id`` with ``status``, ``reason`` (tag catnet.failure) and ``end_time`` (ms;
    None: now)."""
    if reason:
        client.set_tag(run_id, "catnet.failure", reason[:5000])
    client.set_terminated(run_id, status, end_time=end_time)


def children(client, parent_id: str, status: str | None = None) -> list:
    experiment_id = client.get_run(parent_id).info.experiment_id
    where = f"tags.mlflow.parentRunId = '{parent_id}'" + (f" and attributes.status = '{status}'" if status else "")
    return client.search_runs([experiment_id], where, max_results=10000)


def close_children(client, parent_id: str, status: str, reason: str) -> None:
    """Every child still RUNNING gets ``status`` and ``reason``."""
    for child in children(client, parent_id, "RUNNING"):
        close(client, child.info.run_id, status, reason)


def abort(client, parent_id: str, status: str, reason: str) -> None:
    """The sweep was stopped: the parent and every child still running get ``status``."""
    try:
        close_children(client, parent_id, status, f"the sweep was stopped ({reason})")
    finally:
        close(client, parent_id, status, f"the sweep was stopped ({reason})")


def count(outcomes: list[dict]) -> dict[str, int]:
    """The jobs by outcome. ``diverged``: FAILED because the training diverged or collapsed (a
    result of the configuration, not a failure of the sweep); ``failed``: FAILED for another reason;
    ``pruned``: KILLED by the search's pruner (a result); ``killed``: KILLED otherwise (stopped)."""
    statuses = [o.get("status") for o in outcomes]
    diverged = sum(1 for o in outcomes if o.get("status") == "FAILED" and o.get("diverged"))
    pruned = sum(1 for o in outcomes if o.get("status") == "KILLED" and o.get("pruned") is not None)
    return {"jobs": len(statuses), "finished": statuses.count("FINISHED"), "failed": statuses.count("FAILED") - diverged,
            "diverged": diverged, "pruned": pruned, "killed": statuses.count("KILLED") - pruned,
            "running": statuses.count("RUNNING"),
            "reused": sum(1 for o in outcomes if o.get("status") == "FINISHED" and o.get("reused"))}


def failures(counts: dict[str, int]) -> int:
    """The jobs that make a sweep fail: failed for a reason other than their training's result (a bad
    value, a bug, an outage), stopped, or never ended."""
    return counts["failed"] + counts["killed"] + counts["running"]


def unsettled(outcomes: list[dict]) -> list[str]:
    """What the jobs left for the sweep to record (``settle``), described."""
    return ([f"run {o['unfinished']} left RUNNING" for o in outcomes if o.get("unfinished")]
            + [f"job {o['unrecorded'].get('name')!r} has no run" for o in outcomes if o.get("unrecorded")])


def unchecked(outcomes: list[dict], why: str, parent_id: str) -> dict:
    """``finish``'s result for a sweep whose store could not be opened or written at its end:
    a job that said FINISHED is not counted a success, its run unchecked."""
    outcomes = [{**o, "status": "FAILED", "reason": "its record could not be checked in the store"}
                if o.get("status") == "FINISHED" and o.get("run") else o for o in outcomes]
    counts = count(outcomes)
    failed = failures(counts)
    reason = "; ".join(filter(None, [failed and f"{failed} of {counts['jobs']} jobs failed", why]))
    return {"counts": counts, "status": "FAILED", "reason": reason, "summary": {},
            "lost": unsettled(outcomes) + [f"the sweep's parent run {parent_id}"]}


def finish(client, parent_id: str, outcomes: list[dict], order: Sequence[str], direction: str, helped: bool,
           before=None) -> dict:
    """A sweep's end in the store: the jobs' outcomes checked against their runs (``reconcile``;
    ``before()`` first: waiting for a server), what the jobs could not record recorded
    (``settle``), the counts and best child on the parent (``summarize``), the parent closed.
    ``helped``: a helper wrote the runs' records after their jobs ended, so a FINISHED job whose
    run cannot be checked does not count as a success. Returns the ``counts``, the sweep's
    ``status`` and ``reason``, the ``summary`` and what the store did not take (``lost``)."""
    unchecked = None  # why the jobs' runs could not be compared with what the jobs said
    try:
        if before is not None:
            before()
        outcomes = reconcile(client, parent_id, outcomes)
    except Exception as e:  # noqa: BLE001 - said below, with the parent's other troubles
        unchecked = e
        if helped:  # what the helper wrote after a job ended is unknown: not counted a success
            outcomes = [{**o, "status": "FAILED", "reason": "its record could not be checked in the store"}
                        if o.get("status") == "FINISHED" and o.get("run") else o for o in outcomes]
    counts = count(outcomes)
    status, reason = "FINISHED", None
    failed = failures(counts)
    if failed:
        status, reason = "FAILED", f"{failed} of {counts['jobs']} jobs failed"
    summary: dict[str, Any] = {}
    lost = unsettled(outcomes)
    try:
        if unchecked is not None:
            raise unchecked
        lost = settle(client, parent_id, outcomes)
        summary = summarize(client, parent_id, counts, order, direction)
    except Exception as e:  # noqa: BLE001 - the parent must not stay RUNNING
        status = "FAILED"
        why = store.brief(e) if store.unreachable(e) else f"the sweep's summary could not be written: {store.brief(e)}"
        reason = "; ".join(filter(None, [reason, why]))
    try:
        close(client, parent_id, status, reason)
    except Exception as e:  # noqa: BLE001
        lost.insert(0, f"the sweep's parent run {parent_id} left RUNNING{_why(e)}")
        status, reason = "FAILED", reason or "the sweep's parent run could not be closed"
    return {"counts": counts, "status": status, "reason": reason, "summary": summary, "lost": lost}


def summarize(client, parent_id: str, counts: dict[str, int], order: Sequence[str], direction: str) -> dict:
    """Record on the parent the job counts and the best FINISHED child by ``order``."""
    from mlflow.entities import Metric, Param, RunTag

    finished = [r for r in children(client, parent_id) if r.info.status == "FINISHED"]
    metrics = [Metric("sweep/jobs", counts["jobs"], 0, 0), Metric("sweep/finished", counts["finished"], 0, 0),
               Metric("sweep/failed", failures(counts), 0, 0), Metric("sweep/diverged", counts["diverged"], 0, 0),
               Metric("sweep/pruned", counts["pruned"], 0, 0),
               Metric("sweep/reused", counts.get("reused", 0), 0, 0),
               Metric("sweep/trained", counts["finished"] - counts.get("reused", 0), 0, 0)]
    key, ranked = query.rank(finished, lambda r: r.data.metrics, order, direction)
    summary: dict[str, Any] = {"objective": key}
    tags = []
    if ranked:
        best = ranked[0]  # a reused job's link stands for the run that trained (and holds the model)
        summary.update(best_run_id=reuse.origin(best), best_run_name=best.info.run_name)
        tags += [RunTag("catnet.best_run_id", reuse.origin(best)), RunTag("catnet.best_run_name", best.info.run_name or ""),
                 RunTag("catnet.best_by", key)]
        metrics += [Metric(f"best/{k}", v, 0, 0) for k, v in best.data.metrics.items()
                    if k.split("/")[-1] in (*HEADLINE, "final_error")]  # its sets' headline measures
    params = [Param("sweep.objective", f"{key or 'none'} ({direction})")]
    client.log_batch(parent_id, metrics=metrics, tags=tags, params=params)
    if ranked:  # the children log their weights, not a model: the best one's is made here, once
        summary["best_model_uri"] = model.ensure(client, client.get_run(summary["best_run_id"]))
    return summary


def reconcile(client, parent_id: str, outcomes: list[dict]) -> list[dict]:
    """The jobs' outcomes, each FINISHED job's checked against its run in the store, which has
    the last word: a sweep's record helper (pipeline/tracking/writer.py) writes a run's
    record, and ends it, after its job ended. A job whose run is not FINISHED counts as FAILED
    with the run's reason; one whose run is still RUNNING (the writer did not end it), also as
    ``unfinished``, for ``settle`` to close it FAILED."""
    ids = {o["run"] for o in outcomes if o.get("status") == "FINISHED" and o.get("run")}
    if not ids:
        return outcomes
    runs = {r.info.run_id: r for r in children(client, parent_id) if r.info.run_id in ids}
    checked = []
    for outcome in outcomes:
        run = runs.get(outcome.get("run") or "")
        if outcome.get("status") != "FINISHED" or not outcome.get("run") or (run and run.info.status == "FINISHED"):
            checked.append(outcome)
        elif run is None:
            checked.append({**outcome, "status": "FAILED", "reason": f"its run {outcome['run']} is not in the store"})
        elif run.info.status == "RUNNING":
            checked.append({**outcome, "status": "FAILED", "unfinished": outcome["run"],
                            "reason": "its record was not written whole: the record helper did not end its run"})
        else:
            checked.append({**outcome, "status": "FAILED",
                            "reason": run.data.tags.get("catnet.failure") or f"its run is {run.info.status}"})
    return checked


def settle(client, parent_id: str, outcomes: list[dict]) -> list[str]:
    """Record what the jobs could not while the store was down: a run left RUNNING is FAILED
    with its job's reason; a job with no run gets a FAILED child (its name, params, reason).
    Returns what could still not be recorded, one description each."""
    from mlflow.entities import Param

    experiment_id = client.get_run(parent_id).info.experiment_id
    lost = []
    for outcome in outcomes:
        reason = f"{outcome.get('reason') or 'its job failed'}; closed by the sweep: the job could not record its end"
        if outcome.get("unfinished"):
            try:
                close(client, outcome["unfinished"], "FAILED", reason)
            except Exception as e:  # noqa: BLE001
                lost.append(f"run {outcome['unfinished']} left RUNNING{_why(e)}")
        job = outcome.get("unrecorded")
        if job:
            try:
                tags = {**job.get("tags", {}), "mlflow.parentRunId": parent_id, "mlflow.source.name": "pipeline",
                        "catnet.failure": f"{outcome.get('reason')}; recorded by the sweep: the store was down"[:5000]}
                child = client.create_run(experiment_id, run_name=job.get("name"), tags=tags)
                client.log_batch(child.info.run_id, params=[Param(k, v) for k, v in job.get("params", {}).items()])
                client.set_terminated(child.info.run_id, "FAILED")
            except Exception as e:  # noqa: BLE001
                lost.append(f"job {job.get('name')!r} has no run{_why(e)}")
    return lost


def _why(error: BaseException) -> str:
    return "" if store.unreachable(error) else f" ({store.brief(error)})"


def attach(client, run_id: str, paths, folder: str) -> None:
    """Log files (a comparison of the sweep's runs, say) to a run under ``folder``."""
    for path in paths:
        client.log_artifact(run_id, str(path), folder)
