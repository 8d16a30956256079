"""Classification metrics from predicted probabilities."""

from __future__ import annotations

import numpy as np

from catnet.network import Network, forward, loss_value


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


def evaluate(net: Network, x: np.ndarray, y: np.ndarray, loss: str = "sse") -> dict:
    """Error (the training loss over the set) and classification metrics of ``net`` on (x, y)."""
    x = np.asarray(x, dtype=net.weights[0].dtype)
    h = forward(net, x)[-1]  # (N, 1)
    out = {"error": loss_value(h, y.reshape(-1, 1).astype(h.dtype), loss)}
    out.update(classification_metrics(h[:, 0], y))
    return out
