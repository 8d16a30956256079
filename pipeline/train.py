"""Stage ``train``: train the network by gradient descent (full batch by default), log it to MLflow.

Writes models/weights.npz (W1..WL, b1..bL with bias), reports/train_history.csv (the error
of every epoch, a DVC plot), reports/learning_curve.png and reports/mlflow_run.json (the id
of the MLflow run, which the evaluate stage continues).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig

from catnet import train as catnet_train
from catnet.hdf5 import Split
from catnet.network import Network
from catnet.preprocess import Normalizer
from pipeline import curve, load, normalize, tracking
from pipeline.common import (
    CONF_DIR, Outputs, is_multirun, load_npz, log, run_cli, run_main, save_json,
)

METRIC = {"error": "train/error", "val_error": "val/error"}  # per-epoch MLflow metric names


def recipe(cfg: DictConfig) -> catnet_train.Recipe:
    """The training recipe the config describes (catnet.train.Recipe)."""
    return catnet_train.Recipe(
        hidden_sizes=tuple(cfg.model.hidden_sizes), activation=cfg.model.activation, bias=cfg.model.bias,
        init=cfg.model.init, dtype=cfg.train.dtype, epochs=cfg.train.epochs, lr=cfg.train.lr, loss=cfg.train.loss,
        solver=cfg.train.solver, batch_size=cfg.train.batch_size, class_weight=cfg.train.class_weight,
        augment=cfg.train.augment, image_shape=tuple(cfg.data.image_shape),
        max_error_ratio=cfg.train.divergence_ratio, patience=cfg.train.divergence_patience,
        check_learned=cfg.train.check_learned)


def run(cfg: DictConfig, splits: load.Splits, normalizer: Normalizer, mlrun: tracking.NullRun,
        drawer: curve.Helper | None = None, trial: Any = None) -> tuple[Network, dict[str, float]]:
    """Train; return the network and the cross-validation metrics (empty unless data.cv_folds).
    ``drawer``: the helper process started to draw the learning curve (pipeline/curve.py);
    ``trial``: the Optuna search's trial this job is (pipeline.search.Trial), told the running
    cross-validation score after each fold (or the validation error every few epochs); it raises
    TrialPruned to stop the job."""
    out = Outputs.of(cfg)
    epochs = cfg.train.epochs
    show = cfg.train.progress and sys.stderr.isatty() and not is_multirun()
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=epochs, desc="train", unit="epoch", leave=False, mininterval=0.2)

    first_epoch_at = []
    stride = epoch_stride(epochs, cfg.tracking.max_epoch_points)

    def on_epoch(epoch: int, errors: dict[str, float]) -> None:
        if epoch == 1:
            first_epoch_at.append(process_age())
        if epoch % stride == 0 or epoch == epochs:
            mlrun.log_epoch(epoch, {METRIC[k]: v for k, v in errors.items()})
        if trial is not None:
            trial.on_epoch(epoch, errors)
        if bar is not None:
            bar.update()
            if epoch % 10 == 0 or epoch == epochs:
                bar.set_postfix_str(" ".join(f"{k}={v:.4f}" for k, v in errors.items()), refresh=False)

    cv = cross_validate(cfg, splits.train, trial.on_fold if trial else None) if cfg.data.cv_folds else {}
    if cv:
        mlrun.log_metrics(cv)
    start = time.perf_counter()
    val = (splits.val.x, splits.val.y) if splits.val else None
    try:
        trained = catnet_train.train_network(recipe(cfg), splits.train.x, splits.train.y, normalizer, cfg.seed,
                                             val=val, on_epoch=on_epoch)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    net, history = trained.net, trained.history

    # each file is written where only this run writes, logged from there, then put in place
    mlrun.log_output(out.weights, lambda f: np.savez(f, **weight_arrays(net, cfg)))
    mlrun.log_output(out.history, lambda f: _write_history(f, history), mode="w")
    if not is_multirun():  # a person looks at one run's curve; a sweep's curves are compared by the parent
        mlrun.log_output_later(out.curve, curve.png(  # drawn while the run goes on; written at its end
            {METRIC[k]: v for k, v in history.items()}, f"training error ({cfg.train.loss})",
            f"hidden {list(cfg.model.hidden_sizes)}, lr {cfg.train.lr}, seed {cfg.seed}", drawer))
    mlrun.set_tags({"catnet.trained": "true"})
    log.info("train: %d epochs in %.2f s (%.2f ms/epoch), %s, %d images, error %.4g -> %.4g; first epoch "
             "done %.2f s after the process started", epochs, seconds, 1000 * seconds / epochs, _describe(net, cfg),
             trained.images, history["error"][0], history["error"][-1], first_epoch_at[0])
    return net, cv


def weight_arrays(net: Network, cfg: DictConfig) -> dict[str, np.ndarray]:
    """What weights.npz holds: W1..WL (b1..bL), the hidden activation and the image shape the
    network reads, so that the file alone rebuilds it (evaluate, the MLflow model)."""
    return {**net.file_arrays(), "image_shape": np.asarray(cfg.data.image_shape, dtype=np.int64)}


def epoch_stride(epochs: int, max_points: int | None) -> int:
    """Log every k-th epoch to MLflow so that a run sends at most ``max_points`` points per
    metric (plus the last epoch): writing a point costs MLflow's store about as much as an epoch
    of this network, so a very long run would otherwise spend as long logging as training."""
    return 1 if max_points is None else max(1, -(-epochs // max_points))


def process_age() -> float:
    """Seconds since this process started. On Linux from the kernel's start tick and the boot
    clock (10 ms steps); psutil's create_time adds the boot time, which Linux gives in whole
    seconds, so an age from it is up to 1 s too long. Elsewhere, psutil's."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError, IndexError):
        pass
    try:
        import psutil

        return time.time() - psutil.Process().create_time()
    except ImportError:  # psutil comes with MLflow; without it, say nothing wrong
        return float("nan")


def cross_validate(cfg: DictConfig, train: Split, on_fold=None) -> dict[str, float]:
    """Mean validation metrics of the configured recipe over ``data.cv_folds`` stratified folds
    of the training set (catnet.cv.cross_validate; split by ``data.split_seed``, ``data.cv_repeats``
    times), each fold's normalization fitted as the normalize stage fits it. A steadier ranking
    for a sweep than one small validation split; the test set is never touched."""
    from catnet import preprocess
    from catnet.cv import cross_validate as cv

    result = cv(recipe(cfg), train.x, train.y,
                lambda rows: preprocess.fit(rows, cfg.normalize.method, divisor=cfg.normalize.divisor),
                folds=cfg.data.cv_folds, repeats=cfg.data.cv_repeats, split_seed=cfg.data.split_seed, seed=cfg.seed,
                on_fold=on_fold)
    log.info("train: %d-fold cross-validation%s: balanced accuracy %.3f, accuracy %.3f", cfg.data.cv_folds,
             f" x {cfg.data.cv_repeats} repeats" if cfg.data.cv_repeats > 1 else "",
             result["cv/balanced_accuracy"], result["cv/accuracy"])
    return result


def read(cfg: DictConfig) -> Network:
    """The trained network, rebuilt from weights.npz alone (its activation is in the file)."""
    arrays = load_npz(Outputs.of(cfg).weights, "train")
    net = Network.from_arrays(arrays, activation=None if "activation" in arrays else cfg.model.activation)
    if net.activation != cfg.model.activation:
        log.warning("evaluate: %s was trained with activation %s, not model.activation=%s; using %s",
                    Outputs.of(cfg).weights, net.activation, cfg.model.activation, net.activation)
    return net


def read_run_info(cfg: DictConfig) -> dict | None:
    """The run the train stage handed over, or None if training has not succeeded."""
    import json

    path = Outputs.of(cfg).run_info
    return json.loads(path.read_text()) if path.exists() else None


def _describe(net: Network, cfg: DictConfig) -> str:
    sizes = "-".join(map(str, net.layer_sizes))
    augmented = f" +{cfg.train.augment}" if cfg.train.augment else ""
    return f"{sizes} {cfg.model.activation}{' +bias' if cfg.model.bias else ''} {cfg.train.dtype}{augmented}"


def _write_history(f, history: dict[str, np.ndarray]) -> None:
    """epoch, then each metric to 9 significant digits: a row per epoch, one format call a row."""
    f.write(",".join(["epoch", *history]) + "\n")
    columns = [np.asarray(v).tolist() for v in history.values()]
    row = "%d" + ",%.9g" * len(columns) + "\n"
    f.write("".join([row % values for values in zip(range(1, len(columns[0]) + 1), *columns)]))


def _stage(cfg: DictConfig) -> None:
    """The train stage alone (dvc repro): the run stays RUNNING for the evaluate stage, which
    finds it in reports/mlflow_run.json, written only once training succeeded."""
    out = Outputs.of(cfg)
    previous = read_run_info(cfg)
    for stale in (out.run_info, out.weights):  # a failed run leaves no weights to evaluate
        stale.unlink(missing_ok=True)
    if cfg.tracking.enabled and previous and previous.get("run_id"):
        tracking.life.supersede(cfg, previous)  # its weights are gone: evaluate can never continue it
    splits, normalizer = load.read(cfg), normalize.read(cfg)
    digest = load.digest(splits)
    key = tracking.reuse.identity(cfg, digest) if cfg.tracking.enabled else None
    # the curve's helper started first thing (pipeline/curve.py); by its identity tag, a later
    # sweep's identical job reuses this run (pipeline/tracking/reuse.py)
    with (curve.helper() as drawer,
          tracking.open_run(cfg, finish=False, tags=tracking.reuse.run_tags(digest, key)) as mlrun):
        mlrun.record_data(digest, load.sources(cfg))
        run(cfg, splits, normalizer, mlrun, drawer)  # the run stays RUNNING: evaluate finishes it
    # the configured tracking.uri, not the resolved one: the project may move
    save_json(out.run_info, {"run_id": mlrun.run_id, "tracking_uri": cfg.tracking.uri})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_cli(_stage, cfg)


if __name__ == "__main__":
    curve.start_early(sys.argv[1:])
    run_main(main)
