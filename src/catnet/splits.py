"""Stratified validation splits and cross-validation folds: each part keeps the share of
every class that the whole set has.

Why not scikit-learn's ``train_test_split(stratify=)`` / ``StratifiedKFold``: importing
``sklearn.model_selection`` takes 2.1-2.4 s on the 2-core machine the project is measured on,
longer than a whole untracked run; these take microseconds. tests/test_library.py checks them
against the class counts worked out by hand.
"""

from __future__ import annotations

import numpy as np

from catnet.errors import BadValue, DataError


def stratified_indices(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The increasing indices (rest, validation) of a validation set of about ``fraction`` of
    the images, carved out class by class (round(fraction * class size) of each class), so that
    every class keeps at least one image on each side."""
    if not 0 < fraction < 1:
        raise BadValue("fraction", fraction, "must lie in (0, 1)")
    y = np.asarray(y)
    val_idx = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        if len(idx) < 2:
            raise DataError(f"cannot carve a validation set: class {label} has {len(idx)} image; "
                            "each side needs one of every class")
        n_val = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
        val_idx.append(rng.permutation(idx)[:n_val])
    is_val = np.zeros(len(y), dtype=bool)
    is_val[np.concatenate(val_idx)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def stratified_folds(y: np.ndarray, folds: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Increasing indices of ``folds`` validation folds: each class's images, in an order drawn
    from ``rng``, are dealt into the folds in near-equal parts (sizes differ by at most one), so
    every fold keeps each class's share and every index is in exactly one fold."""
    y = np.asarray(y)
    if folds < 2:
        raise BadValue("folds", folds, "must be >= 2")
    labels, counts = np.unique(y, return_counts=True)
    if len(labels) and folds > counts.min():
        smallest = int(np.argmin(counts))
        raise BadValue("folds", folds, f"more folds than the {counts[smallest]} images of class "
                                       f"{labels[smallest]}: every fold needs one of each class")
    parts: list[list[np.ndarray]] = [[] for _ in range(folds)]
    for label in labels:
        for i, part in enumerate(np.array_split(rng.permutation(np.flatnonzero(y == label)), folds)):
            parts[i].append(part)
    return [np.sort(np.concatenate(p)) for p in parts]
