"""Stage ``load``: read and validate the HDF5 files, flatten every image to a vector.

Writes data/flat/{train,test}.npz: x (N, 12288) uint8, y (N,) uint8.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from catnet.data import Split, flatten, load_dataset
from pipeline.common import CONF_DIR, Outputs, load_npz, log, resolve, run_cli, save_npz


def run(cfg: DictConfig) -> tuple[Split, Split]:
    train, test = load_dataset(
        resolve(cfg.data.train_path), resolve(cfg.data.test_path), tuple(cfg.data.image_shape),
        names=(f"data.train_path={cfg.data.train_path}", f"data.test_path={cfg.data.test_path}"),
    )
    train, test = flatten(train), flatten(test)
    out = Outputs.of(cfg)
    save_npz(out.flat_train, x=train.x, y=train.y)
    save_npz(out.flat_test, x=test.x, y=test.y)
    log.info(
        "load: %d train images (%d cats), %d test images (%d cats), %d features each",
        len(train), int(train.y.sum()), len(test), int(test.y.sum()), train.x.shape[1],
    )
    return train, test


def read(cfg: DictConfig) -> tuple[Split, Split]:
    """This stage's outputs, for the stages that run after it in another process."""
    out = Outputs.of(cfg)
    train, test = load_npz(out.flat_train, "load"), load_npz(out.flat_test, "load")
    return Split(train["x"], train["y"]), Split(test["x"], test["y"])


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_cli(run, cfg)


if __name__ == "__main__":
    main()
