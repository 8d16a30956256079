"""Typed schema of the configuration composed from ``conf/``.

``prepare`` turns what Hydra composed into the typed config every stage uses: it checks
types against the schema below (``train.lr=abc`` fails) and values (``train.lr=-1`` fails)
before any stage does work, each failure one line naming the knob. The schema is applied
here rather than from the defaults list so that any Hydra composition of ``conf/`` (DVC's
``dvc exp run`` composes it too) needs nothing but the YAML files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional

import math
import os
from pathlib import Path

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from catnet.augment import AUGMENTATIONS
from catnet.errors import ConfigError, check_choice
from catnet.network import ACTIVATIONS, INITS, LOSSES
from catnet.train import SOLVERS
from catnet.preprocess import METHODS

DTYPES = ("float32", "float64")


@dataclass
class DataConfig:
    train_path: str = MISSING  # HDF5 file, relative to the project root or absolute
    test_path: str = MISSING
    image_shape: list[int] = field(default_factory=lambda: [64, 64, 3])
    val_fraction: float = 0.0  # > 0: a stratified validation set carved from the training file
    split_seed: int = 0  # seeds that split (apart from ``seed``, so the split stays put)
    cv_folds: int = 0  # >= 2: also k-fold cross-validate the config on the training set (cv/... metrics)
    cv_repeats: int = 1  # repeat the k folds with split seed split_seed+r and weight seed seed+r


@dataclass
class NormalizeConfig:
    method: str = "scale"  # scale: x / divisor; standardize: per-feature, train-set statistics
    divisor: float = 255.0


@dataclass
class ModelConfig:
    hidden_sizes: list[int] = MISSING
    activation: str = "sigmoid"  # hidden layers; the output neuron is always a sigmoid
    bias: bool = False
    init: str = "xavier"


@dataclass
class TrainConfig:
    epochs: int = MISSING
    lr: float = MISSING
    dtype: str = "float32"
    loss: str = "sse"
    progress: bool = True  # progress bar when stderr is a terminal (never in multirun)
    batch_size: Optional[int] = None  # None: full batch (the seed's); n: shuffled mini-batches of n
    divergence_ratio: Optional[float] = 1.4  # stop when the error stays above this x its first value
    divergence_patience: int = 20  # ... for this many epochs in a row
    class_weight: Optional[str] = None  # None: every example weighs 1 (the seed's); balanced
    solver: str = "auto"  # full batch: primal (update W1) | dual (W1 = W1(0) + X^T A) | auto (cheaper one)
    augment: Optional[str] = None  # None: the training images as they are (the seed's); hflip: plus mirrored
    check_learned: bool = True  # FAILED when the trained network is no better than a constant prediction


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: sqlite:///<project>/mlruns/mlflow.db
    experiment: str = "catnet"
    run_name: Optional[str] = None  # None: the command-line overrides, or MLflow's random name
    flush_seconds: float = 10.0  # per-epoch metrics are sent in batches at most this often
    max_epoch_points: Optional[int] = 10000  # longer runs log every k-th epoch to MLflow; None: all
    retry_seconds: Optional[float] = 60.0  # how long a job waits out a tracking server that does not answer


@dataclass
class SweepConfig:
    objective: str = "val/balanced_accuracy"  # the metric a sweep ranks its jobs by (never a test metric)
    direction: str = "maximize"  # maximize | minimize
    fallback: str = "train/balanced_accuracy"  # ranked by when no job logged the objective (val_fraction=0)
    reuse: bool = True  # a job whose identity matches a FINISHED run links it instead of training again


@dataclass
class PathsConfig:
    out_dir: Optional[str] = None  # None: the project root (one job) or the job's Hydra dir (multirun)


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


# the config key that feeds each parameter of the library (catnet.errors: its errors name the parameter)
KNOBS = {
    "lr": "train.lr", "epochs": "train.epochs", "batch_size": "train.batch_size", "loss": "train.loss",
    "solver": "train.solver", "class_weight": "train.class_weight", "augment": "train.augment",
    "activation": "model.activation", "init": "model.init", "method": "normalize.method",
    "divisor": "normalize.divisor", "folds": "data.cv_folds", "fraction": "data.val_fraction",
}


def prepare(cfg: DictConfig, root: Path | None = None) -> DictConfig:
    """The composed config, typed and checked. Inside ``dvc exp run`` the stage reads
    ``params.yaml`` instead, which DVC has just composed from ``conf/`` and the ``-S`` overrides."""
    if root is not None and os.environ.get("DVC_EXP_BASELINE_REV") and (root / "params.yaml").exists():
        cfg = OmegaConf.load(root / "params.yaml")
    try:
        typed = OmegaConf.merge(_schema(), cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}") from None
    validate(typed)
    return typed


@lru_cache(maxsize=1)
def _schema() -> DictConfig:
    """The typed schema, built once per process (6 ms, each job of a sweep paid it): merge copies
    its first argument and never changes it."""
    return OmegaConf.structured(Config)


def metric_key(split: str, measure: str) -> str:
    """The MLflow name of a set's measure: ``train/accuracy``, ``test/error``. The training and
    validation errors are per-epoch histories (train/error, val/error: one point per epoch), so
    their values after the last update are train/final_error and val/final_error."""
    if measure in ("error", "loss"):
        return f"{split}/{'final_error' if split in ('train', 'val') else 'error'}"
    return f"{split}/{measure}"


def refuse_test_metric(knob: str, metric: str) -> None:
    """The rule of every ranking (pipeline/tracking/query.py): nothing is ever selected or
    ranked on the test set."""
    if str(metric).split("/", 1)[0] == "test":
        raise ConfigError(f"{knob}={metric}: runs are never selected or ranked on the test set; "
                          "use a val/ (data.val_fraction > 0), cv/ (data.cv_folds) or train/ metric")


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError, naming the knob, for the first value that is out of range."""
    if not cfg.data.train_path or not cfg.data.test_path:
        raise ConfigError("data.train_path and data.test_path must name HDF5 files")
    shape = list(cfg.data.image_shape)
    if not shape or any(s < 1 for s in shape):
        raise ConfigError(f"data.image_shape={shape}: must be positive sizes, e.g. [64,64,3]")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction}: must lie in [0, 1)")
    if cfg.data.cv_folds == 1 or cfg.data.cv_folds < 0:
        raise ConfigError(f"data.cv_folds={cfg.data.cv_folds}: must be 0 (off) or >= 2")
    if cfg.data.split_seed < 0:
        raise ConfigError(f"data.split_seed={cfg.data.split_seed}: must be >= 0")
    if cfg.data.cv_repeats < 1:
        raise ConfigError(f"data.cv_repeats={cfg.data.cv_repeats}: must be >= 1")
    check_choice("normalize.method", cfg.normalize.method, METHODS)
    if not 0 < cfg.normalize.divisor < float("inf"):
        raise ConfigError(f"normalize.divisor={cfg.normalize.divisor}: must be a finite number > 0")
    hidden = cfg.model.hidden_sizes
    if not isinstance(hidden, (list, ListConfig)) or len(hidden) == 0:
        raise ConfigError(f"model.hidden_sizes={_show(hidden)}: must list at least one layer width, e.g. [20,7]")
    if any(h < 1 for h in hidden):
        raise ConfigError(f"model.hidden_sizes={_show(hidden)}: every width must be >= 1")
    check_choice("model.activation", cfg.model.activation, ACTIVATIONS)
    check_choice("model.init", cfg.model.init, INITS)
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs={cfg.train.epochs}: must be >= 1")
    lr = cfg.train.lr
    if not (lr > 0 and lr != float("inf")):
        raise ConfigError(f"train.lr={lr}: must be a finite number > 0")
    check_choice("train.dtype", cfg.train.dtype, DTYPES)
    if cfg.train.batch_size is not None and cfg.train.batch_size < 1:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size}: must be >= 1, or null for full batch")
    ratio = cfg.train.divergence_ratio
    if ratio is not None and not ratio > 1:
        raise ConfigError(f"train.divergence_ratio={ratio}: must be > 1, or null to stop only on NaN/inf")
    if cfg.train.divergence_patience < 1:
        raise ConfigError(f"train.divergence_patience={cfg.train.divergence_patience}: must be >= 1")
    check_choice("train.loss", cfg.train.loss, LOSSES)
    check_choice("train.solver", cfg.train.solver, SOLVERS)
    if cfg.train.class_weight is not None:
        check_choice("train.class_weight", cfg.train.class_weight, ("balanced",))
    if cfg.train.augment is not None:
        check_choice("train.augment", cfg.train.augment, AUGMENTATIONS)
        if len(shape) < 2:
            raise ConfigError(f"train.augment={cfg.train.augment}: needs images of (height, width, ...), "
                              f"not data.image_shape={shape}")
    if cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed}: must be >= 0")
    uri = cfg.tracking.uri
    if uri is not None and not str(uri).startswith(("sqlite:///", "http://", "https://", "databricks")):
        raise ConfigError(f"tracking.uri={uri}: use sqlite:///<path>.db or http(s)://<server> "
                          "(MLflow's file store is not supported)")
    if not cfg.tracking.experiment:
        raise ConfigError("tracking.experiment: must not be empty")
    check_choice("sweep.direction", cfg.sweep.direction, ("maximize", "minimize"))
    refuse_test_metric("sweep.objective", cfg.sweep.objective)
    refuse_test_metric("sweep.fallback", cfg.sweep.fallback)
    if not cfg.tracking.flush_seconds >= 0:
        raise ConfigError(f"tracking.flush_seconds={cfg.tracking.flush_seconds}: must be >= 0")
    if cfg.tracking.retry_seconds is not None and not 0 <= cfg.tracking.retry_seconds < math.inf:
        raise ConfigError(f"tracking.retry_seconds={cfg.tracking.retry_seconds}: must be a number of seconds >= 0, "
                          "or null for MLflow's own retries")
    if cfg.tracking.max_epoch_points is not None and cfg.tracking.max_epoch_points < 1:
        raise ConfigError(f"tracking.max_epoch_points={cfg.tracking.max_epoch_points}: must be >= 1, "
                          "or null for every epoch")


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(value))
    return str(value)


def flatten(cfg: DictConfig, resolve: bool = True) -> dict[str, str]:
    """{'model.hidden_sizes': '[20, 7]', 'train.lr': '0.005', ...}: MLflow params."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=resolve), "")
    return out
