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
from pipeline import provenance
from pipeline.tracking import model, query, reuse, store
from pipeline.provenance import parent_run_id, provenance_tags, run_name
from pipeline.tracking.run import PRUNED_TAG

log = logging.getLogger("catnet")


def describe(name: str, description: str, params: dict[str, str]) -> dict:
    """A sweep's parent run as ``Parent.open`` creates it: its name, tags (``description`` as its
    note), params and start (ms)."""
    import time

    return {"name": name[:250], "start": int(time.time() * 1000),
            "tags": {"catnet.sweep": "parent", "mlflow.source.name": "pipeline -m",
                     "mlflow.note.content": description[:5000],
                     **provenance.provenance_tags(), **provenance.process_tags()},
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

    def finish(self, jobs: list, order: Sequence[str], direction: str) -> dict:
        return finish(self.client, self.parent["id"], jobs, order, direction, before=self.before)

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
    """The jobs by outcome: ``diverged`` (FAILED by its training: a result, as ``pruned`` by the search
    is), ``failed`` (FAILED otherwise), ``killed`` (stopped), ``running`` (never ended)."""
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


def outcome(run) -> dict:
    """How a job ended, as its MLflow run says: status, and the tags that tell a result (diverged,
    pruned) or a reused run apart."""
    tags = run.data.tags
    return {"status": run.info.status, "diverged": "catnet.diverged_epoch" in tags,
            "pruned": tags.get(PRUNED_TAG), "reused": tags.get(query.REUSED_TAG), "run": run.info.run_id}


def returned(job) -> dict:
    """How a job ended, as its return to the sweeper says (a Hydra JobReturn): what an untracked
    sweep counts, and a tracked one whose store does not answer at its end."""
    import math

    try:
        value = job.return_value
    except Exception as e:  # noqa: BLE001 - the job raised
        return {"status": "FAILED", "reason": f"{type(e).__name__}: {e}"}
    if isinstance(value, dict):
        if value.get("state") == "pruned":
            return {"status": "KILLED", "pruned": value.get("step")}
        return {"status": "FAILED", "diverged": bool(value.get("diverged")), "reason": value.get("reason"),
                "run": value.get("run"), "job": value.get("job")}
    finite = isinstance(value, (int, float)) and math.isfinite(value)
    return {"status": "FINISHED" if finite else "FAILED"}


def summary_of(outcomes: list[dict], lost: list[str] | None = None, why: str | None = None) -> dict:
    """The sweep's end: its ``counts``, ``status`` and ``reason``; what the store did not take (``lost``)."""
    counts = count(outcomes)
    failed = failures(counts)
    reason = "; ".join(filter(None, [failed and f"{failed} of {counts['jobs']} jobs failed", why])) or None
    return {"counts": counts, "status": "FAILED" if reason else "FINISHED", "reason": reason, "summary": {},
            "lost": lost or []}


def finish(client, parent_id: str, jobs: list, order: Sequence[str], direction: str, before=None) -> dict:
    """A sweep's end in the store, whose runs have the last word: a child still RUNNING (its job
    could not end it) closed FAILED, a FAILED child made for each job that has no run (the store
    was down when it failed: its return names it), the counts and best child on the parent
    (``summarize``), the parent closed. ``jobs``: the jobs' returns to the sweeper (Hydra
    JobReturns); ``before()``: what to wait for first (a server's return). If the store cannot
    be read, the counts are the returns' and ``lost`` says what the store lacks."""
    said = [returned(job) for job in jobs]
    try:
        if before is not None:
            before()
        why = {o["run"]: o.get("reason") for o in said if o.get("run")}  # a job's reason, if it returned one
        for child in children(client, parent_id, "RUNNING"):
            close(client, child.info.run_id, "FAILED", f"{why.get(child.info.run_id) or 'its job ended'}; "
                  "closed by the sweep: the job could not close its run")
        for job in (o for o in said if o["status"] == "FAILED" and not o.get("run") and o.get("job")):
            record_failed(client, parent_id, job)
        outcomes = [outcome(r) for r in children(client, parent_id)]
        result = summary_of(outcomes)
    except Exception as e:  # noqa: BLE001 - the store is gone: what the jobs said, and what is lost
        lost = [f"the sweep's parent run {parent_id} left RUNNING"]
        lost += [f"run {o['run']} left RUNNING" for o in said if o["status"] == "FAILED" and o.get("run")]
        lost += [f"job {o['job']['name']!r} has no run" for o in said if o["status"] == "FAILED"
                 and not o.get("run") and o.get("job")]
        return summary_of(said, lost, store.brief(e) if store.unreachable(e)
                          else f"the sweep's summary could not be written: {store.brief(e)}")
    try:
        result["summary"] = summarize(client, parent_id, result["counts"], order, direction)
    except Exception as e:  # noqa: BLE001 - the parent must not stay RUNNING
        why = store.brief(e) if store.unreachable(e) else f"the sweep's summary could not be written: {store.brief(e)}"
        result.update(status="FAILED", reason="; ".join(filter(None, [result["reason"], why])))
    try:
        close(client, parent_id, result["status"], result["reason"])
    except Exception as e:  # noqa: BLE001
        result["lost"].insert(0, f"the sweep's parent run {parent_id} left RUNNING{_why(e)}")
        result.update(status="FAILED", reason=result["reason"] or "the sweep's parent run could not be closed")
    return result


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


def record_failed(client, parent_id: str, outcome: dict) -> None:
    """A FAILED child for a job that has none (its name, params and reason, from its return)."""
    from mlflow.entities import Param

    job = outcome["job"]
    tags = {**job.get("tags", {}), "mlflow.parentRunId": parent_id, "mlflow.source.name": "pipeline",
            "catnet.failure": f"{outcome.get('reason')}; recorded by the sweep: the store was down"[:5000]}
    child = client.create_run(client.get_run(parent_id).info.experiment_id, run_name=job.get("name"), tags=tags)
    client.log_batch(child.info.run_id, params=[Param(k, v) for k, v in job.get("params", {}).items()])
    client.set_terminated(child.info.run_id, "FAILED")


def _why(error: BaseException) -> str:
    return "" if store.unreachable(error) else f" ({store.brief(error)})"


def attach(client, run_id: str, paths, folder: str) -> None:
    """Log files (a comparison of the sweep's runs, say) to a run under ``folder``."""
    for path in paths:
        client.log_artifact(run_id, str(path), folder)


def job_record(cfg: DictConfig) -> dict:
    """What a failed job's run records (its name, params as given, process tags): in its return to
    the sweeper, for the sweep to record when the job could not (``record_failed``)."""
    try:
        params = {k: v[:6000] for k, v in config.flatten(cfg, resolve=False).items()}
    except Exception:  # noqa: BLE001 - a config that cannot even be flattened: its name is enough
        params = {}
    return {"name": run_name(cfg), "params": params, "tags": {**provenance_tags(), **provenance.process_tags()}}


def failed_run(cfg: DictConfig, error: BaseException) -> str | None:
    """Record a job that failed before its run could start (a bad value, say): a FAILED run
    with the reason, its params as given. None when the store cannot be reached."""
    from mlflow.entities import Param

    try:
        tags = {"mlflow.source.name": "pipeline", "catnet.failure": f"{type(error).__name__}: {told(error)}"[:5000],
                **provenance_tags(), **provenance.process_tags()}
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
