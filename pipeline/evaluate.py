"""Stage ``evaluate``: accuracy, error, precision, recall and confusion counts on both sets.

Writes reports/metrics.json (``dvc metrics show``) and logs the metrics to the run the train
stage opened, then marks that run FINISHED.
"""

from __future__ import annotations

import hydra
import numpy as np
from omegaconf import DictConfig

from catnet.data import Split
from catnet.metrics import evaluate
from catnet.network import Network
from catnet.preprocess import Normalizer
from pipeline import load, normalize, tracking, train
from pipeline.common import CONF_DIR, Outputs, log, run_cli, save_json


def run(cfg: DictConfig, train_set: Split, test_set: Split, normalizer: Normalizer, net: Network,
        mlrun: tracking.NullRun) -> dict:
    dtype = np.dtype(cfg.train.dtype)
    results = {}
    for name, split in (("train", train_set), ("test", test_set)):
        m = evaluate(net, normalizer.apply(split.x, dtype), split.y, loss=cfg.train.loss)
        results[name] = {
            "accuracy": m["accuracy"], "error": m["error"], "precision": m["precision"],
            "recall": m["recall"],
            "confusion": {k: m[k] for k in ("tp", "fp", "fn", "tn")},
        }
    save_json(Outputs.of(cfg).metrics, results)
    # train/error is the per-epoch history (one point per epoch); the final values go beside it
    mlrun.log_metrics({
        "train/accuracy": results["train"]["accuracy"],
        "train/final_error": results["train"]["error"],
        "train/precision": results["train"]["precision"],
        "train/recall": results["train"]["recall"],
        **{f"test/{k}": v for k, v in results["test"].items() if k != "confusion"},
        **{f"test/{k}": v for k, v in results["test"]["confusion"].items()},
    })
    log.info("evaluate: train accuracy %.3f error %.4g | test accuracy %.3f error %.4g "
             "precision %.3f recall %.3f", results["train"]["accuracy"], results["train"]["error"],
             results["test"]["accuracy"], results["test"]["error"], results["test"]["precision"],
             results["test"]["recall"])
    return results


def _stage(cfg: DictConfig) -> None:
    train_set, test_set = load.read(cfg)
    normalizer, net = normalize.read(cfg), train.read(cfg)
    with tracking.open_run(cfg, resume=train.read_run_info(cfg)) as mlrun:
        run(cfg, train_set, test_set, normalizer, net, mlrun)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_cli(_stage, cfg)


if __name__ == "__main__":
    main()
