"""Classification metrics from predicted probabilities."""

from __future__ import annotations

from typing import Callable

import numpy as np

from catnet.errors import DataError
from catnet.network import Network, example_weights, forward, loss_value


# what a set is summed up by wherever a few numbers stand for it: the cross-validation means (cv/...),
# a sweep's best child (best/...) and the comparison table; every measure ``evaluate`` returns is logged
HEADLINE = ("accuracy", "balanced_accuracy", "error")


def classification_metrics(proba: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, balanced accuracy (the mean recall of the classes the set holds: blind to how
    many cats it has; on a set of one class, that class's recall), precision, recall (cat =
    positive; 0 when undefined) and the confusion counts.

    Why not scikit-learn's ``balanced_accuracy_score`` and friends: importing ``sklearn.metrics``
    takes over 2 s here; tests/test_library.py checks these against it and against counts
    worked out by hand."""
    if len(y) == 0:
        raise DataError("no images to measure: the set is empty")
    pred = np.asarray(proba) >= threshold
    truth = np.asarray(y).astype(bool)
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    tn = int(np.sum(~pred & ~truth))
    recalls = [hits / n for hits, n in ((tp, tp + fn), (tn, tn + fp)) if n]  # classes present
    return {
        "accuracy": (tp + tn) / len(y),
        "balanced_accuracy": sum(recalls) / len(recalls),
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
    }


def evaluate(net: Network, x: np.ndarray, y: np.ndarray, loss: str = "sse",
             transform: Callable[[np.ndarray], np.ndarray] | None = None, block: int = 256,
             class_weight: tuple[float, float] | None = None) -> dict:
    """Error (the training loss over the set) and classification metrics of ``net`` on (x, y).

    ``transform``: x holds raw rows (pixels) and ``transform(rows)`` gives the network inputs;
    the forward pass then runs ``block`` rows at a time, so a set whose float copy would not fit
    in memory is still evaluated (x may be catnet.npy.NpyRows, read on demand).
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
