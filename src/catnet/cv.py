"""Cross-validation: the mean validation metrics of a training recipe over stratified folds."""

from __future__ import annotations

from typing import Callable

import numpy as np

from catnet.metrics import HEADLINE, evaluate
from catnet.splits import stratified_folds
from catnet.train import Recipe, train_network


def cross_validate(recipe: Recipe, pixels, labels: np.ndarray, fit_normalizer: Callable, *, folds: int,
                   repeats: int = 1, split_seed: int = 0, seed: int = 0,
                   on_fold: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, float]:
    """Mean ``cv/<measure>`` of ``recipe`` for each HEADLINE measure (accuracy, balanced accuracy, error) over
    ``folds`` stratified folds of (pixels, labels): each fold's network trains by the same path
    as a run (train_network: full batch or mini-batch, augmentation on the training folds only)
    on the other folds, with ``fit_normalizer(rows)`` fitted on them, and is measured on the fold.
    With ``repeats`` = r > 1 the folds are drawn r times (repeat i: split seed split_seed + i,
    weight seed seed + i), so the mean also averages over initializations. ``on_fold(k, means)``,
    if given, is called after the k-th network (1, 2, ... folds x repeats) with the running means
    so far: a search prunes a hopeless trial on them (it may raise to stop here)."""
    pixels = np.asarray(pixels)  # every fold reads most of the images: read them once
    labels = np.asarray(labels)
    scores: dict[str, list[float]] = {}
    for repeat in range(repeats):
        for fold in stratified_folds(labels, folds, np.random.default_rng(split_seed + repeat)):
            held_out = np.zeros(len(labels), dtype=bool)
            held_out[fold] = True
            rows = pixels[~held_out]
            norm = fit_normalizer(rows)
            trained = train_network(recipe, rows, labels[~held_out], norm, seed + repeat)
            m = evaluate(trained.net, norm.apply(pixels[held_out], recipe.dtype), labels[held_out],
                         loss=recipe.loss, class_weight=trained.class_weight)
            for k in HEADLINE:
                scores.setdefault(f"cv/{k}", []).append(m[k])
            if on_fold is not None:
                on_fold(len(scores[f"cv/{HEADLINE[0]}"]), {k: float(np.mean(v)) for k, v in scores.items()})
    return {k: float(np.mean(v)) for k, v in scores.items()}
