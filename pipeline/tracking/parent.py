"""A sweep's parent run: opened before any job starts, closed with the job counts and the best
child (by the one ranking rule, query.rank), or KILLED with its running children. The sweep's
process writes it (``Parent``); pipeline/sweep.py only calls ``open``, ``finish`` and ``abort``."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from omegaconf import DictConfig

from catnet.metrics import HEADLINE
from pipeline import config
from pipeline.common import told
from pipeline.tracking import model, names, query, reuse, store
from pipeline.tracking.names import parent_run_id, provenance_tags, run_name

log = logging.getLogger("catnet")


def describe(name: str, description: str, params: dict[str, str]) -> dict:
    """A sweep's parent run as ``Parent.open`` creates it: its name, tags (``description`` as its
    note), params and start (ms)."""
    import time

    return {"name": name[:250], "start": int(time.time() * 1000),
            "tags": {"catnet.sweep": "parent", "mlflow.source.name": "pipeline -m",
                     "mlflow.note.content": description[:5000],
                     **names.provenance_tags(), **store.process_tags()},
            "params": {k: str(v)[:6000] for k, v in params.items()}}


class Parent:
    """The sweep's parent run ``parent`` (``describe``), written by the sweep's process.
    ``before()``: what to wait for before the end (a server's return)."""

    def __init__(self, config: DictConfig, parent: dict, before: Callable | None = None):
        self.config, self.parent, self.before = config, parent, before
        self.client = None

    def open(self) -> str:
        """The store opened (the experiment made if new) and the RUNNING parent run created; its id."""
        from mlflow.entities import Param

        if self.client is None:
            self.client, experiment_id = store.open_store(self.config)
            p = self.parent
            p["id"] = self.client.create_run(experiment_id, start_time=p["start"], tags=p["tags"],
                                             run_name=p["name"]).info.run_id
            self.client.log_batch(p["id"], params=[Param(k, v) for k, v in p["params"].items()])
        return self.parent["id"]

    def finish(self, outcomes: list[dict], order: Sequence[str], direction: str) -> dict:
        return finish(self.client, self.parent["id"], outcomes, order, direction, before=self.before)

    def abort(self, status: str, reason: str) -> None:
        abort(self.client, self.parent["id"], status, reason)


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


def finish(client, parent_id: str, outcomes: list[dict], order: Sequence[str], direction: str, before=None) -> dict:
    """A sweep's end in the store: the jobs' outcomes checked against their runs (``reconcile``;
    ``before()`` first: waiting for a server), what the jobs could not record recorded
    (``settle``), the counts and best child on the parent (``summarize``), the parent closed.
    Returns the ``counts``, the sweep's
    ``status`` and ``reason``, the ``summary`` and what the store did not take (``lost``)."""
    unchecked = None  # why the jobs' runs could not be compared with what the jobs said
    try:
        if before is not None:
            before()
        outcomes = reconcile(client, parent_id, outcomes)
    except Exception as e:  # noqa: BLE001 - said below, with the parent's other troubles
        unchecked = e
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
    the last word. A job whose run is not FINISHED counts as FAILED with the run's reason; one
    whose run is still RUNNING, also as ``unfinished``, for ``settle`` to close it FAILED."""
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
                            "reason": "its job ended without closing its run"})
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


def job_record(cfg: DictConfig) -> dict:
    """What a failed run of ``cfg`` records (its name, params as given, process tags), for the
    sweep to record when this job could not (parent.settle)."""
    try:
        params = {k: v[:6000] for k, v in config.flatten(cfg, resolve=False).items()}
    except Exception:  # noqa: BLE001 - a config that cannot even be flattened: its name is enough
        params = {}
    return {"name": run_name(cfg), "params": params, "tags": {**provenance_tags(), **store.process_tags()}}


def failed_run(cfg: DictConfig, error: BaseException) -> str | None:
    """Record a job that failed before its run could start (a bad value, say): a FAILED run
    with the reason, its params as given. None when the store cannot be reached."""
    from mlflow.entities import Param

    try:
        tags = {"mlflow.source.name": "pipeline", "catnet.failure": f"{type(error).__name__}: {told(error)}"[:5000],
                **provenance_tags(), **store.process_tags()}
        if parent := parent_run_id():
            tags["mlflow.parentRunId"] = parent
        client, experiment_id = store.open_store(cfg)
        run_id = client.create_run(experiment_id, run_name=run_name(cfg), tags=tags).info.run_id
        try:
            client.log_batch(run_id, params=[Param(k, v[:6000])
                                             for k, v in config.flatten(cfg, resolve=False).items()])
        finally:
            client.set_terminated(run_id, "FAILED")
        return run_id
    except Exception as e:  # noqa: BLE001 - the store is down or the config unusable: the log says it
        log.error("tracking: could not record the failed job (%s); the sweep records it if the store answers "
                  "by its end", store.brief(e))
        return None
