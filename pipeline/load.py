"""Stage ``load``: read and validate the HDF5 files, flatten every image to a vector.

Writes data/flat/{train,test}.npz: x (N, 12288) uint8, y (N,) uint8; with
``data.val_fraction`` > 0 also data/flat/val.npz, carved (stratified) from the training file.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dataclasses import dataclass

import numpy as np

from catnet.data import Split, flatten, load_dataset, stratified_split
from pipeline.common import CONF_DIR, Outputs, load_npz, log, resolve, run_cli, save_npz


@dataclass(frozen=True)
class Splits:
    train: Split
    test: Split
    val: Split | None = None

    def named(self) -> list[tuple[str, Split]]:
        return [(n, s) for n, s in (("train", self.train), ("val", self.val), ("test", self.test)) if s]


def run(cfg: DictConfig) -> Splits:
    train, test = load_dataset(
        resolve(cfg.data.train_path), resolve(cfg.data.test_path), tuple(cfg.data.image_shape),
        names=(f"data.train_path={cfg.data.train_path}", f"data.test_path={cfg.data.test_path}"),
    )
    splits = Splits(flatten(train), flatten(test))
    if cfg.data.val_fraction > 0:
        rest, val = stratified_split(splits.train, cfg.data.val_fraction,
                                     np.random.default_rng(cfg.data.split_seed))
        splits = Splits(rest, splits.test, val)
    out = Outputs.of(cfg)
    out.flat_val.unlink(missing_ok=True)
    for name, split in splits.named():
        save_npz(out.flat_dir / f"{name}.npz", x=split.x, y=split.y)
    log.info("load: %s; %d features each", ", ".join(
        f"{len(s)} {n} images ({int(s.y.sum())} cats)" for n, s in splits.named()), train.x[0].size)
    return splits


def read(cfg: DictConfig) -> Splits:
    """This stage's outputs, for the stages that run after it in another process."""
    out = Outputs.of(cfg)
    arrays = {n: load_npz(out.flat_dir / f"{n}.npz", "load") for n in ("train", "test")}
    if cfg.data.val_fraction > 0:
        arrays["val"] = load_npz(out.flat_val, "load")
    return Splits(**{n: Split(a["x"], a["y"]) for n, a in arrays.items()})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_cli(run, cfg)


if __name__ == "__main__":
    main()
