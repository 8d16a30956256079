"""Stage ``evaluate``: accuracy, error, precision, recall and confusion counts on both sets.

Writes reports/metrics.json (``dvc metrics show``) and logs the metrics to the run the train
stage opened, then marks that run FINISHED.
"""

from __future__ import annotations

import hydra
import numpy as np
from omegaconf import DictConfig

from catnet.errors import DataError
from catnet.metrics import evaluate
from catnet.network import Network, class_weights
from catnet.preprocess import Normalizer
from pipeline import load, normalize, tracking, train
from pipeline.common import CONF_DIR, Outputs, log, run_cli, run_main, save_json
from pipeline.config import metric_key


def run(cfg: DictConfig, splits: load.Splits, normalizer: Normalizer, net: Network,
        mlrun: tracking.NullRun) -> dict:
    dtype = np.dtype(cfg.train.dtype)
    weights = class_weights(splits.train.y, cfg.train.class_weight)  # the error as training measured it
    results = {}
    kept = isinstance(normalizer, normalize.KeptInputs)  # a sweep's inputs, made already: block by block alike
    for name, split in splits.named():
        m = evaluate(net, normalizer.apply(split.x, dtype) if kept else split.x, split.y, loss=cfg.train.loss,
                     transform=(lambda rows: rows) if kept else lambda rows: normalizer.apply(rows, dtype),
                     class_weight=weights)
        results[name] = {
            "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "loss": m["error"], "precision": m["precision"],  # "error" would read as a failure to DVC
            "recall": m["recall"],
            "confusion": {k: m[k] for k in ("tp", "fp", "fn", "tn")},
        }
    out = Outputs.of(cfg)
    save_json(out.metrics, results)
    mlrun.log_metrics(mlflow_metrics(results))
    example = splits.test.x[:2].reshape(-1, *cfg.data.image_shape)  # raw uint8 images
    # the network and normalizer evaluated here, from memory: the model is what these metrics judge
    mlrun.log_model(train.weight_arrays(net, cfg), normalizer.to_arrays(), example)
    log.info("evaluate: %s | test precision %.3f recall %.3f", " | ".join(
        f"{n} accuracy {m['accuracy']:.3f} error {m['loss']:.4g}" for n, m in results.items()),
        results["test"]["precision"], results["test"]["recall"])
    return results


def mlflow_metrics(results: dict) -> dict[str, float]:
    """train/accuracy, test/error, test/tp, ... (``metric_key``); the confusion counts of test."""
    out = {}
    for split, m in results.items():
        for k, v in m.items():
            if k == "confusion":
                if split == "test":
                    out.update({f"test/{c}": n for c, n in v.items()})
            else:
                out[metric_key(split, k)] = v
    return out


def _stage(cfg: DictConfig) -> None:
    """The evaluate stage alone (dvc repro): continues the run the train stage handed over."""
    info = train.read_run_info(cfg)
    if info is None and cfg.tracking.enabled:
        raise DataError(f"{Outputs.of(cfg).run_info}: not found: training has not succeeded "
                        "(dvc repro train)")
    splits, normalizer, net = load.read(cfg), normalize.read(cfg), train.read(cfg)
    with tracking.open_run(cfg, resume=info or {}) as mlrun:
        run(cfg, splits, normalizer, net, mlrun)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_cli(_stage, cfg)


if __name__ == "__main__":
    run_main(main)
