"""Stage ``load``: read and validate the HDF5 files, flatten every image to a vector.

Writes data/flat/{train,test}.npz: x (N, 12288) uint8, y (N,) uint8; with
``data.val_fraction`` > 0 also data/flat/val.npz, carved (stratified) from the training file.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dataclasses import dataclass

import numpy as np

from pathlib import Path

from catnet.data import Split, dvc_dir_digest, flatten, load_dataset, stratified_split
from catnet.errors import DataError
from pipeline.common import CONF_DIR, ROOT, Outputs, load_npz, log, resolve, run_cli, save_npz


@dataclass(frozen=True)
class Splits:
    train: Split
    test: Split
    val: Split | None = None

    def named(self) -> list[tuple[str, Split]]:
        return [(n, s) for n, s in (("train", self.train), ("val", self.val), ("test", self.test)) if s]


def verify_dvc_tracked(path: Path) -> None:
    """If ``path`` lies in a folder DVC tracks (``<folder>.dvc`` beside it), refuse to go on
    when the folder no longer matches what that file records: no silent training on altered data."""
    import yaml

    for folder in path.parents:
        if folder == ROOT.parent or folder == folder.parent:
            return
        dvcfile = folder.with_name(folder.name + ".dvc")
        if dvcfile.is_file():
            outs = (yaml.safe_load(dvcfile.read_text()) or {}).get("outs") or [{}]
            tracked = str(outs[0].get("md5", "")).removesuffix(".dir")
            actual = dvc_dir_digest(folder)
            if tracked and actual != tracked:
                raise DataError(
                    f"{folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder} does not match "
                    f"{dvcfile.name} (md5 {actual}, recorded {tracked}): restore it with "
                    f"`dvc checkout {dvcfile.name}`, or record the change with `dvc add`")
            return


def run(cfg: DictConfig) -> Splits:
    for key in ("train_path", "test_path"):
        path = resolve(cfg.data[key])
        if path.exists():
            verify_dvc_tracked(path)
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
