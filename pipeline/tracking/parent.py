"""A sweep's parent run: opened before any job starts, closed with the job counts and the best
child (by the one ranking rule, query.rank), or KILLED with its running children."""

from __future__ import annotations

from typing import Any, Sequence

from omegaconf import DictConfig

from pipeline.tracking import model, query, reuse, run, store


def open_parent(config: DictConfig, name: str, params: dict[str, str]) -> tuple[Any, str]:
    """(client, parent run id): a RUNNING parent in the configured experiment, with ``params``."""
    client, experiment_id = store.open_store(config)  # first: it imports MLflow (store.import_code)
    from mlflow.entities import Param

    parent = client.create_run(experiment_id, run_name=name[:250], tags={
        "catnet.sweep": "parent", "mlflow.source.name": "pipeline -m",
        **run.provenance_tags(), **store.process_tags(),
    })
    client.log_batch(parent.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return client, parent.info.run_id


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


def summarize(client, parent_id: str, counts: dict[str, int], order: Sequence[str], direction: str) -> dict:
    """Record on the parent the job counts and the best FINISHED child by ``order``."""
    from mlflow.entities import Metric, Param, RunTag

    finished = [r for r in children(client, parent_id) if r.info.status == "FINISHED"]
    failed = counts["failed"] + counts["killed"] + counts["running"]
    metrics = [Metric("sweep/jobs", counts["jobs"], 0, 0), Metric("sweep/finished", counts["finished"], 0, 0),
               Metric("sweep/failed", failed, 0, 0), Metric("sweep/reused", counts.get("reused", 0), 0, 0),
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
                    if k.split("/")[-1] in ("accuracy", "balanced_accuracy", "final_error", "error")]
    params = [Param("sweep.objective", f"{key or 'none'} ({direction})")]
    client.log_batch(parent_id, metrics=metrics, tags=tags, params=params)
    if ranked:  # the children log their weights, not a model: the best one's is made here, once
        summary["best_model_uri"] = model.ensure(client, client.get_run(summary["best_run_id"]))
    return summary


def reconcile(client, parent_id: str, outcomes: list[dict]) -> list[dict]:
    """The jobs' outcomes, each FINISHED job's checked against its run in the store, which has
    the last word: a sweep's metric writer process (pipeline/tracking/writer.py) writes a run's
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
                            "reason": "its record was not written whole: the metric writer process did not end its run"})
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
