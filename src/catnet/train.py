"""Gradient descent, epoch after epoch: full batch (the seed's), or shuffled mini-batches."""

from __future__ import annotations

from typing import Callable

import numpy as np

from catnet.errors import ConfigError, TrainingDiverged
from catnet.network import LOSSES, Network, backward, check_choice, forward, loss_value


class _DivergenceGuard:
    """Raises TrainingDiverged when the error is NaN/inf, or stays above ``ratio`` times the
    first epoch's error for ``patience`` epochs in a row (None: only NaN/inf)."""

    def __init__(self, ratio: float | None, patience: int):
        self.ratio, self.patience = ratio, patience
        self.first: float | None = None
        self.above = 0

    def check(self, epoch: int, error: float) -> None:
        if not np.isfinite(error):
            raise TrainingDiverged(epoch, error)
        if self.first is None:
            self.first = error
        elif self.ratio is not None:
            self.above = self.above + 1 if error > self.ratio * self.first else 0
            if self.above >= self.patience:
                raise TrainingDiverged(epoch, error, f"the error stayed above {self.ratio} times its first "
                                                     f"value {self.first:.6g} since epoch {epoch - self.above + 1}")


def _descend(net: Network, x: np.ndarray, acts: list[np.ndarray], y: np.ndarray, loss: str, lr: float) -> None:
    """One gradient-descent update in place: W <- W - lr * dE/dW (and b)."""
    steps_w, steps_b = backward(net, x, acts, y, loss, scale=lr)  # lr * dE/dW
    for w, step in zip(net.weights, steps_w):
        w -= step
    if steps_b is not None:
        for b, step in zip(net.biases, steps_b):
            b -= step


def fit(
    net: Network,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    loss: str = "sse",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    max_error_ratio: float | None = None,
    patience: int = 20,
) -> dict[str, np.ndarray]:
    """Train ``net`` in place; return {"error": the training error of every epoch} (measured
    before that epoch's update), plus "val_error" on the same weights when ``val`` is given.

    x: (N, D) inputs, y: (N,) labels in {0, 1}. Each epoch: forward pass over all N images,
    E = loss over the set, backward pass, W <- W - lr * dE/dW. ``on_epoch(epoch, errors)`` is
    called after each update (epoch counts from 1). Raises TrainingDiverged when the error
    becomes NaN or infinite, or (with ``max_error_ratio``) stays above that multiple of the
    first epoch's error for ``patience`` epochs in a row: gradient descent overshooting until
    the sigmoids saturate, which with a bounded output never shows as NaN. (A single spike that
    recovers, which full-batch descent near its stability limit produces, is not divergence.)
    """
    check_choice("train.loss", loss, LOSSES)
    if epochs < 1:
        raise ConfigError(f"train.epochs={epochs}: must be >= 1")
    if not lr > 0:
        raise ConfigError(f"train.lr={lr}: must be > 0")
    dtype = net.weights[0].dtype
    x = np.ascontiguousarray(x, dtype=dtype)
    y = np.asarray(y, dtype=dtype).reshape(-1, 1)  # (N, 1), like the output layer
    if val is not None:
        x_val = np.ascontiguousarray(val[0], dtype=dtype)
        y_val = np.asarray(val[1], dtype=dtype).reshape(-1, 1)
    history = {"error": np.empty(epochs)}
    if val is not None:
        history["val_error"] = np.empty(epochs)
    guard = _DivergenceGuard(max_error_ratio, patience)
    for epoch in range(1, epochs + 1):
        acts = forward(net, x)
        error = loss_value(acts[-1], y, loss)
        guard.check(epoch, error)
        errors = {"error": error}
        if val is not None:
            errors["val_error"] = loss_value(forward(net, x_val)[-1], y_val, loss)
        _descend(net, x, acts, y, loss, lr)
        for k, v in errors.items():
            history[k][epoch - 1] = v
        if on_epoch is not None:
            on_epoch(epoch, errors)
    return history


def fit_minibatch(
    net: Network,
    take: Callable[[np.ndarray], np.ndarray],
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    rng: np.random.Generator,
    loss: str = "sse",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    max_error_ratio: float | None = None,
    patience: int = 20,
) -> dict[str, np.ndarray]:
    """Mini-batch gradient descent: each epoch visits the N images once in a fresh order drawn
    from ``rng``, one update per batch of ``batch_size``. ``take(indices)`` returns the network
    inputs (len(indices), D) of those images, so they can stream from disk (catnet.data.H5Images)
    and only one batch is in memory. The epoch's error is the sum of its batches' errors, each
    measured before that batch's update; with batch_size >= N this is full-batch descent.
    """
    check_choice("train.loss", loss, LOSSES)
    if batch_size < 1:
        raise ConfigError(f"train.batch_size={batch_size}: must be >= 1")
    dtype = net.weights[0].dtype
    y = np.asarray(y, dtype=dtype).reshape(-1, 1)
    n = len(y)
    history = {"error": np.empty(epochs)}
    guard = _DivergenceGuard(max_error_ratio, patience)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        error = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            xb = np.ascontiguousarray(take(idx), dtype=dtype)  # (b, D)
            acts = forward(net, xb)
            error += loss_value(acts[-1], y[idx], loss)
            _descend(net, xb, acts, y[idx], loss, lr)
        guard.check(epoch, error)
        history["error"][epoch - 1] = error
        if on_epoch is not None:
            on_epoch(epoch, {"error": error})
    return history
