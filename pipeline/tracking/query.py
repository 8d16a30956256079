"""Searching and ranking runs: the one rule a sweep, ``register`` and ``compare`` all use.

A run is ranked by the first metric of an order that it has: the configured objective (a
validation metric by default), then cross-validation, then the training set. A ``test/``
metric never ranks, selects or picks anything: it is refused wherever one is named.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence, TypeVar

from catnet.errors import ConfigError
from pipeline.config import refuse_test_metric  # noqa: F401 - the rule lives with the config's checks

CV_METRIC = "cv/balanced_accuracy"
TRAIN_METRIC = "train/balanced_accuracy"
T = TypeVar("T")
IDENTITY_TAG = "catnet.identity"  # a run's identity (pipeline/tracking/reuse.py)
REUSED_TAG = "catnet.reused_from"  # a reused job's run: the run it stands for


def metric_order(objective: str, fallback: str | None = None,
                 knobs: tuple[str, str] = ("objective", "fallback")) -> list[str]:
    """The metrics tried in turn: ``objective``, cross-validation, then ``fallback`` (the
    training set's balanced accuracy by default). Raises ConfigError, naming the ``knobs`` they
    came from, for a test metric."""
    refuse_test_metric(knobs[0], objective)
    if fallback is not None:
        refuse_test_metric(knobs[1], fallback)
    return list(dict.fromkeys([objective, CV_METRIC, fallback or TRAIN_METRIC]))


def objective_value(metrics: Mapping[str, float], order: Sequence[str]) -> tuple[str | None, float]:
    """(metric, value) of the first metric in ``order`` that ``metrics`` holds; (None, NaN) if none."""
    for key in order:
        if key in metrics:
            return key, float(metrics[key])
    return None, math.nan


def rank(items: Iterable[T], metrics_of: Callable[[T], Mapping[str, float]], order: Sequence[str],
         direction: str = "maximize") -> tuple[str | None, list[T]]:
    """(the metric used, the items that have it, best first). The metric is the first in
    ``order`` that any item has; ties go to the lower final error on the same set."""
    items = list(items)
    for key in order:
        ranked = [it for it in items if _finite(metrics_of(it).get(key))]
        if ranked:
            sign = -1.0 if direction == "maximize" else 1.0
            tiebreak = f"{key.split('/')[0]}/final_error"

            def sort_key(it):
                m = metrics_of(it)
                return sign * float(m[key]), float(m.get(tiebreak, m.get(f"{key.split('/')[0]}/error", 0.0)))

            return key, sorted(ranked, key=sort_key)
    return None, []


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def _filter(parent: str | None, with_model: bool) -> str:
    where = ["attributes.status = 'FINISHED'"]
    if with_model:  # trained: weights.npz logged, the model logged too or made from it (model.ensure)
        where.append("tags.`catnet.trained` = 'true'")
    if parent:
        where.append(f"tags.mlflow.parentRunId = '{parent}'")
    return " and ".join(where)


def finished_runs(client, experiment_id: str, parent: str | None = None, with_model: bool = False,
                  max_results: int = 50000) -> list:
    """The FINISHED runs of an experiment (of one sweep parent; ``with_model``: only those that
    trained, whose model is logged or can be made from their weights: model.ensure)."""
    return client.search_runs([experiment_id], _filter(parent, with_model), max_results=max_results)


def runs_since(client, experiment_id: str, started_ms: int, name: str, tags: dict[str, str]) -> list[str]:
    """Ids of the runs named ``name`` with ``tags`` that started at or after ``started_ms``, newest first."""
    where = [f"attributes.start_time >= {int(started_ms)}"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    runs = client.search_runs([experiment_id], " and ".join(where), order_by=["attributes.start_time DESC"])
    return [r.info.run_id for r in runs if r.info.run_name == name]


def finished_runs_frame(experiment_id: str, parent: str | None = None, max_results: int = 200):
    """The same as a pandas DataFrame (MLflow's columns: run_id, params.*, metrics.*, tags.*),
    without sweep parents, which summarize runs rather than being runs to compare. Across a whole
    experiment a reused job's link (pipeline/tracking/reuse.py) is left out too: the run it stands
    for is in the table already."""
    import mlflow

    runs = mlflow.search_runs(experiment_ids=[experiment_id], filter_string=_filter(parent, False),
                              max_results=max_results)
    if "tags.catnet.sweep" in runs:
        runs = runs[runs["tags.catnet.sweep"] != "parent"]
    if not parent and "tags.catnet.reused_from" in runs:
        runs = runs[runs["tags.catnet.reused_from"].isna()]
    return runs


def metric_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of every point of a run's metric, in step order."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


class Earlier(NamedTuple):
    """A FINISHED run a job stands for (pipeline/tracking/reuse.py): what the job needs of it."""

    run_id: str
    run_name: str
    metrics: dict[str, float]
    tags: dict[str, str]


def identical(client, experiment_id: str, key: str) -> Earlier | None:
    """The earliest FINISHED run of the experiment that trained with identity ``key``, or None."""
    runs = client.search_runs([experiment_id], f"tags.`{IDENTITY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
                              max_results=100, order_by=["attributes.start_time ASC"])
    trained = [r for r in runs if REUSED_TAG not in r.data.tags]
    if not trained:
        return None
    run = trained[0]
    return Earlier(run.info.run_id, run.info.run_name, dict(run.data.metrics), dict(run.data.tags))


def run_of(client, given: str, knob: str = "run_id"):
    """The run ``given`` names: its whole id, or a prefix of at least 8 characters that only it has
    (``compare`` prints 8), in any experiment of the store. A ConfigError naming ``knob`` if none
    or several do."""
    import re

    from mlflow.entities import ViewType

    given = str(given).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,32}", given):
        raise ConfigError(f"{knob}={given}: give a run's id, or at least its first 8 characters")
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(experiments, f"attributes.run_id LIKE '{given}%'", run_view_type=ViewType.ALL,
                              max_results=3) if experiments else []
    if len(runs) != 1:
        what = "no run" if not runs else f"{'more than 2' if len(runs) > 2 else 2} runs ({', '.join(r.info.run_id for r in runs[:2])})"
        raise ConfigError(f"{knob}={given}: {what} in {client.tracking_uri} {'has' if not runs else 'have'} that id"
                          + ("; a team's server: tracking.uri=http://<server>:5000" if not runs else "; give more of it"))
    return runs[0]
