"""Stage ``normalize``: fit the input normalization on the training set.

Writes models/normalizer.npz (method, shift, scale): inputs = (pixels - shift) / scale.
The default divides by 255; ``normalize=standardize`` uses per-feature training statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hydra
import numpy as np
from omegaconf import DictConfig

from catnet import preprocess
from catnet.hdf5 import Split
from catnet.preprocess import Normalizer
from pipeline import load
from pipeline.common import CONF_DIR, Outputs, load_npz, log, run_cli, run_main, save_npz


def run(cfg: DictConfig, train: Split) -> Normalizer:
    normalizer = preprocess.fit(train.x, cfg.normalize.method, divisor=cfg.normalize.divisor)
    save_npz(Outputs.of(cfg).normalizer, **normalizer.to_arrays())
    log.info("normalize: %s over %d features, fitted on %d training images",
             normalizer.method, train.x.shape[1], len(train))
    return normalizer


@dataclass(frozen=True, eq=False)
class KeptInputs(Normalizer):
    """A normalizer that makes the network inputs of a sweep's kept splits (pipeline/load.py: the
    jobs of one process read the same files) once, read-only: each job then trains and is judged
    on the same arrays, and catnet.train keeps their Gram matrix (about 20 ms of each job of the
    default network). Rows of any other array (a mini-batch, an augmented set) are made anew."""

    sources: tuple = ()  # the kept splits' raw rows
    made: dict = field(default_factory=dict)  # (id of the rows, dtype) -> their inputs

    def apply(self, x, dtype: str | np.dtype = np.float32) -> np.ndarray:
        if not any(x is source for source in self.sources):
            return super().apply(x, dtype)
        key = (id(x), np.dtype(dtype).str)
        if key not in self.made:
            inputs = super().apply(x, dtype)
            inputs.flags.writeable = False  # shared by the jobs: none may change it
            self.made[key] = inputs
        return self.made[key]


_KEPT: list[tuple[load.Splits, KeptInputs]] = []  # the kept splits and their inputs, of this process


def kept(normalizer: Normalizer, splits: load.Splits) -> Normalizer:
    """``normalizer``, remembering the inputs it makes of ``splits`` if these are a sweep's kept
    splits; an equal normalizer of the same splits (the next job's) gets the inputs made already."""
    if not load.is_kept(splits):
        return normalizer
    for splits_, known in _KEPT:
        if splits_ is splits and known.method == normalizer.method and np.array_equal(known.shift, normalizer.shift) \
                and np.array_equal(known.scale, normalizer.scale):
            return known
    _KEPT[:] = [(splits, KeptInputs(normalizer.method, normalizer.shift, normalizer.scale,
                                    sources=tuple(s.x for _, s in splits.named())))]
    return _KEPT[0][1]


def read(cfg: DictConfig) -> Normalizer:
    return Normalizer.from_arrays(load_npz(Outputs.of(cfg).normalizer, "normalize"))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_cli(lambda c: run(c, load.read(c).train), cfg)


if __name__ == "__main__":
    run_main(main)
