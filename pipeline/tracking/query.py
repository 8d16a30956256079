"""Searching and ranking runs: the one rule a sweep, ``register`` and ``compare`` all use.

A run is ranked by the first metric of an order that it has: the configured objective (a
validation metric by default), then cross-validation, then the training set. A ``test/``
metric never ranks, selects or picks anything: it is refused wherever one is named.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

from catnet.errors import ConfigError

CV_METRIC = "cv/balanced_accuracy"
TRAIN_METRIC = "train/balanced_accuracy"
T = TypeVar("T")


def refuse_test_metric(knob: str, metric: str) -> None:
    if str(metric).split("/", 1)[0] == "test":
        raise ConfigError(f"{knob}={metric}: runs are never selected or ranked on the test set; "
                          "use a val/ (data.val_fraction > 0), cv/ (data.cv_folds) or train/ metric")


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
