"""Gradient descent, epoch after epoch: full batch (the seed's), or shuffled mini-batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from catnet.errors import BadValue, TrainingCollapsed, TrainingDiverged, check_choice
from catnet.network import LOSSES, Network, backward, example_weights, forward, loss_value


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


SOLVERS = ("auto", "primal", "dual")


class _DualFirstLayer:
    """The first layer's weights kept as W_1 = W_1(0) + X^T A, for full-batch descent.

    Every gradient-descent step on W_1 is X^T (lr * delta_1), a combination of the N training
    images, so W_1 never leaves W_1(0) + span(X^T) and the step is just A <- A - lr * delta_1.
    The product X W_1 the forward pass needs is then X W_1(0) + (X X^T) A: with the Gram matrix
    K = X X^T (N x N) and P_0 = X W_1(0) computed once, an epoch costs an (N x N) @ (N x n_1)
    product instead of two (N x D) products, which for N < D (209 images < 12288 inputs) is
    D/N times less work. The iterates are those of plain descent, in exact arithmetic; in
    floating point they differ by rounding. ``finish()`` writes W_1 back into the network.
    """

    def __init__(self, net: Network, x: np.ndarray, x_val: np.ndarray | None):
        self.net, self.x = net, x
        w1 = net.weights[0]
        self.p0, self.k = x @ w1, _gram(x, x)  # (N, n_1), (N, N)
        self.a = np.zeros((x.shape[0], w1.shape[1]), dtype=w1.dtype)  # (N, n_1)
        self.val = (x_val @ w1, _gram(x_val, x)) if x_val is not None else None  # P_0 and K for x_val

    def z1(self) -> np.ndarray:
        return self.k @ self.a + self.p0  # X W_1

    def z1_val(self) -> np.ndarray:
        p0, k = self.val
        return k @ self.a + p0  # X_val W_1

    def finish(self) -> None:
        w1 = self.net.weights[0]
        w1 += (self.a.T @ self.x).T  # (n_1, D) product, transposed into W_1's column-major layout


_GRAMS: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (a, b, a @ b.T) of read-only inputs


def _gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b.T; kept for the next network trained on the same inputs when both are read-only
    (they cannot change: the inputs a sweep's jobs share, pipeline/normalize.py)."""
    if a.flags.writeable or b.flags.writeable:
        return a @ b.T
    for a_, b_, product in _GRAMS:
        if a_ is a and b_ is b:
            return product
    if not any(a_ is a or b_ is b for a_, b_, _ in _GRAMS):
        _GRAMS.clear()  # other inputs: the last ones go
    product = a @ b.T
    product.flags.writeable = False
    _GRAMS.append((a, b, product))
    return product


def use_dual(solver: str, n: int, d: int, first_width: int, epochs: int) -> bool:
    """``auto``: the dual form when it costs less: fewer images than inputs (N < D), and enough
    epochs to repay the Gram matrix (N^2 D once, against 2 N D n_1 saved per epoch)."""
    check_choice("solver", solver, SOLVERS)
    if solver != "auto":
        return solver == "dual"
    return n < d and 2 * first_width * epochs >= n


def _descend(net: Network, x: np.ndarray, acts: list[np.ndarray], y: np.ndarray, loss: str, lr: float,
             dual: _DualFirstLayer | None = None, weights: np.ndarray | None = None) -> None:
    """One gradient-descent update in place: W <- W - lr * dE/dW (and b); with ``dual``, the
    first layer's step goes to its coefficients A instead."""
    steps_w, steps_b = backward(net, x, acts, y, loss, scale=lr, first_delta=dual is not None,
                                weights=weights)  # lr * dE/dW
    for w, step in zip(net.weights if dual is None else [dual.a, *net.weights[1:]], steps_w):
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
    solver: str = "auto",
    class_weight: tuple[float, float] | None = None,
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

    ``solver``: ``primal`` updates W_1 directly (two (N, D) products per epoch); ``dual`` keeps
    W_1 = W_1(0) + X^T A and updates A (see _DualFirstLayer: the same descent, an (N, N)
    product per epoch); ``auto`` picks dual when it costs less (use_dual). Either way ``net``
    holds the trained W_1 on return, also when training stops with an exception.

    ``class_weight``: (weight of a non-cat, weight of a cat) example in the loss, for the
    training and the validation error alike (catnet.network.class_weights); None: all 1.
    """
    check_choice("loss", loss, LOSSES)
    if epochs < 1:
        raise BadValue("epochs", epochs, "must be >= 1")
    if not lr > 0:
        raise BadValue("lr", lr, "must be > 0")
    dtype = net.weights[0].dtype
    x = np.ascontiguousarray(x, dtype=dtype)
    y = np.asarray(y, dtype=dtype).reshape(-1, 1)  # (N, 1), like the output layer
    w = example_weights(y, class_weight, dtype)
    if val is not None:
        x_val = np.ascontiguousarray(val[0], dtype=dtype)
        y_val = np.asarray(val[1], dtype=dtype).reshape(-1, 1)
        w_val = example_weights(y_val, class_weight, dtype)
    history = {"error": np.empty(epochs)}
    if val is not None:
        history["val_error"] = np.empty(epochs)
    guard = _DivergenceGuard(max_error_ratio, patience)
    dual = None
    if use_dual(solver, *x.shape, net.weights[0].shape[1], epochs):
        dual = _DualFirstLayer(net, x, x_val if val is not None else None)
    try:
        for epoch in range(1, epochs + 1):
            acts = forward(net, x, z1=dual.z1() if dual else None)
            error = loss_value(acts[-1], y, loss, w)
            guard.check(epoch, error)
            errors = {"error": error}
            if val is not None:
                h_val = forward(net, x_val, z1=dual.z1_val() if dual else None)[-1]
                errors["val_error"] = loss_value(h_val, y_val, loss, w_val)
            _descend(net, x, acts, y, loss, lr, dual, w)
            for k, v in errors.items():
                history[k][epoch - 1] = v
            if on_epoch is not None:
                on_epoch(epoch, errors)
    finally:
        if dual is not None:
            dual.finish()
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
    class_weight: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """Mini-batch gradient descent: each epoch visits the N images once in a fresh order drawn
    from ``rng``, one update per batch of ``batch_size``. ``take(indices)`` returns the network
    inputs (len(indices), D) of those images, so they can stream from disk (catnet.hdf5.H5Images)
    and only one batch is in memory. The epoch's error is the sum of its batches' errors, each
    measured before that batch's update; with batch_size >= N this is full-batch descent.
    """
    check_choice("loss", loss, LOSSES)
    if batch_size < 1:
        raise BadValue("batch_size", batch_size, "must be >= 1")
    dtype = net.weights[0].dtype
    y = np.asarray(y, dtype=dtype).reshape(-1, 1)
    w = example_weights(y, class_weight, dtype)
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
            wb = None if w is None else w[idx]
            error += loss_value(acts[-1], y[idx], loss, wb)
            _descend(net, xb, acts, y[idx], loss, lr, weights=wb)
        guard.check(epoch, error)
        history["error"][epoch - 1] = error
        if on_epoch is not None:
            on_epoch(epoch, {"error": error})
    return history


def check_learned(proba: np.ndarray, y: np.ndarray, loss: str = "sse",
                  class_weight: tuple[float, float] | None = None, epoch: int = 0) -> None:
    """Raise TrainingCollapsed when a trained network learned nothing from its training set:
    its outputs ``proba`` (N,) are all the same (a huge step saturates every unit, and the error
    then stays put instead of exploding), or its error is no lower than that of the best
    constant prediction (the weighted share of cats, for either loss)."""
    h = np.asarray(proba, dtype=np.float64).reshape(-1, 1)
    t = np.asarray(y, dtype=np.float64).reshape(-1, 1)
    w = example_weights(y, class_weight, np.float64)
    error = loss_value(h, t, loss, w)
    if len(h) > 1 and float(np.ptp(h)) < 1e-6:
        raise TrainingCollapsed(epoch, error, f"the network gives every training image the same output "
                                              f"({float(h[0, 0]):.6g}): its units saturated")
    weights = np.ones_like(t) if w is None else w
    share = float(np.clip((weights * t).sum() / weights.sum(), 1e-12, 1 - 1e-12))
    constant = loss_value(np.full_like(h, share), t, loss, w)
    if not error < constant:
        raise TrainingCollapsed(epoch, error, f"its training error is no lower than that of predicting "
                                              f"{share:.4g} for every image ({constant:.6g})")


@dataclass(frozen=True)
class Recipe:
    """How a network is made and trained: everything but the data and the seed. The one path
    that both a run and each fold of cross-validation train by (``train_network``)."""

    hidden_sizes: tuple[int, ...] = (20, 7)
    activation: str = "sigmoid"
    bias: bool = False
    init: str = "xavier"
    dtype: str = "float32"
    epochs: int = 1000
    lr: float = 0.005
    loss: str = "sse"
    solver: str = "auto"
    batch_size: int | None = None  # None: full batch
    class_weight: str | None = None  # None or "balanced" (catnet.network.class_weights)
    augment: str | None = None  # None or "hflip" (catnet.augment)
    image_shape: tuple[int, ...] = (64, 64, 3)
    max_error_ratio: float | None = None
    patience: int = 20
    check_learned: bool = True


@dataclass
class Trained:
    net: Network
    history: dict[str, np.ndarray]
    class_weight: tuple[float, float] | None  # the (non-cat, cat) weights the loss used
    images: int  # how many images it learned from (twice the set with hflip)


def train_network(recipe: Recipe, pixels, labels: np.ndarray, normalizer, seed: int, *,
                  val: tuple[np.ndarray, np.ndarray] | None = None,
                  on_epoch: Callable[[int, dict[str, float]], None] | None = None) -> Trained:
    """Make the network of ``recipe`` from ``seed`` and train it on (pixels, labels).

    ``pixels``: (N, D) raw rows, an array or rows read on demand (catnet.npy.NpyRows);
    ``normalizer`` (catnet.preprocess.Normalizer) turns them into network inputs. Full batch
    normalizes the whole set once; mini-batch (``recipe.batch_size``) normalizes batch by batch,
    so only a batch is ever in memory as floats. ``val`` (raw validation pixels and labels) is
    measured every epoch in full-batch mode. With ``recipe.check_learned`` a network that learned
    nothing raises TrainingCollapsed (check_learned)."""
    from catnet.augment import augment
    from catnet.network import class_weights, init_network, predict_proba

    dtype = np.dtype(recipe.dtype)
    rows, labels = augment(pixels, labels, recipe.augment, recipe.image_shape)
    net = init_network([pixels.shape[1], *recipe.hidden_sizes, 1], np.random.default_rng(seed),
                       activation=recipe.activation, bias=recipe.bias, init=recipe.init, dtype=dtype)
    weights = class_weights(labels, recipe.class_weight)
    common = dict(epochs=recipe.epochs, lr=recipe.lr, loss=recipe.loss, on_epoch=on_epoch, class_weight=weights,
                  max_error_ratio=recipe.max_error_ratio, patience=recipe.patience)
    if recipe.batch_size:
        take = lambda idx: normalizer.apply(rows[idx], dtype)  # noqa: E731
        history = fit_minibatch(net, take, labels, batch_size=recipe.batch_size,
                                rng=np.random.default_rng([seed, 1]), **common)
        x = None
    else:
        x = normalizer.apply(rows, dtype)  # (N, D)
        val_inputs = (normalizer.apply(val[0], dtype), val[1]) if val is not None else None
        history = fit(net, x, labels, val=val_inputs, solver=recipe.solver, **common)
    if recipe.check_learned:  # mini-batch: the outputs by blocks, one block of floats at a time
        proba = (predict_proba(net, x) if x is not None else np.concatenate(
            [predict_proba(net, take(np.arange(s, min(s + 256, len(labels))))) for s in range(0, len(labels), 256)]))
        check_learned(proba, labels, recipe.loss, weights, epoch=len(history["error"]))
    return Trained(net, history, weights, len(labels))
