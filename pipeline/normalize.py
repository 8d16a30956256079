"""Stage ``normalize``: fit the input normalization on the training set.

Writes models/normalizer.npz (method, shift, scale): inputs = (pixels - shift) / scale.
The default divides by 255; ``normalize=standardize`` uses per-feature training statistics.
"""

from __future__ import annotations

import hydra
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


def read(cfg: DictConfig) -> Normalizer:
    return Normalizer.from_arrays(load_npz(Outputs.of(cfg).normalizer, "normalize"))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_cli(lambda c: run(c, load.read(c).train), cfg)


if __name__ == "__main__":
    run_main(main)
