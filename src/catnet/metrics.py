"""Classification metrics from predicted probabilities."""

from __future__ import annotations

from typing import Callable

import numpy as np

from catnet.network import Network, example_weights, forward, loss_value


def classification_metrics(proba: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, balanced accuracy (the mean of the recalls of both classes: blind to how many
    cats a set holds), precision, recall (cat = positive) and the confusion counts."""
    pred = proba >= threshold
    truth = y.astype(bool)
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    tn = int(np.sum(~pred & ~truth))
    tpr = tp / (tp + fn) if tp + fn else 0.0
    tnr = tn / (tn + fp) if tn + fp else 0.0
    return {
        "accuracy": (tp + tn) / len(y),
        "balanced_accuracy": (tpr + tnr) / 2,
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tpr,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def evaluate(net: Network, x: np.ndarray, y: np.ndarray, loss: str = "sse",
             transform: Callable[[np.ndarray], np.ndarray] | None = None, block: int = 256,
             class_weight: tuple[float, float] | None = None) -> dict:
    """Error (the training loss over the set) and classification metrics of ``net`` on (x, y).

    ``transform``: x holds raw rows (pixels) and ``transform(rows)`` gives the network inputs;
    the forward pass then runs ``block`` rows at a time, so a set whose float copy would not fit
    in memory is still evaluated (x may be catnet.data.NpyRows, read on demand).
    ``class_weight``: the loss's (non-cat, cat) example weights, as in training
    (catnet.network.class_weights)."""
    dtype = net.weights[0].dtype
    if transform is None:
        h = forward(net, np.asarray(x, dtype=dtype))[-1]  # (N, 1)
    else:
        h = np.concatenate([forward(net, np.asarray(transform(x[s:s + block]), dtype=dtype))[-1]
                            for s in range(0, len(x), block)])
    out = {"error": loss_value(h, y.reshape(-1, 1).astype(h.dtype), loss, example_weights(y, class_weight, h.dtype))}
    out.update(classification_metrics(h[:, 0], y))
    return out
