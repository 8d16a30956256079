"""Stage ``load``: read and validate the HDF5 files, flatten every image to a vector.

Writes data/flat/{train,test}_x.npy (N, 12288) uint8 and {train,test}_y.npy (N,) uint8; with
``data.val_fraction`` > 0 also data/flat/val_{x,y}.npy, carved (stratified) from the training
file. The images are read, checked and written ``BLOCK`` at a time, and the later stages read
them back row by row (catnet.npy.NpyRows), so no stage needs the whole set in memory except
full-batch training itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from catnet.errors import DataError
from catnet.hdf5 import H5Images, Split, check_both_classes
from catnet.npy import NpyRows, load_array, write_npy_rows
from catnet.splits import stratified_indices
from pipeline.common import CONF_DIR, ROOT, Outputs, is_multirun, log, resolve, run_cli, run_main

BLOCK = 1024  # images read, checked and written at a time


@dataclass(frozen=True)
class Splits:
    train: Split
    test: Split
    val: Split | None = None

    def named(self) -> list[tuple[str, Split]]:
        return [(n, s) for n, s in (("train", self.train), ("val", self.val), ("test", self.test)) if s]


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dvc_dir_digest(directory: str | Path) -> str:
    """The md5 ``dvc add <directory>`` records for the directory as it is now (without DVC's
    ``.dir`` suffix): the md5 of the JSON list of its files' md5 and relative paths."""
    import hashlib
    import json

    directory = Path(directory)
    entries = sorted(({"md5": _md5(p), "relpath": p.relative_to(directory).as_posix()}
                      for p in directory.rglob("*") if p.is_file()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries).encode()).hexdigest()


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


# a sweep's jobs in one process (the basic launcher, a warm joblib worker) read the same files:
# the first job reads, checks and writes them; the next ones take its splits (and their digest)
_READ: dict[tuple, Splits] = {}
_DIGESTS: dict[int, str] = {}


def _sweep_key(cfg: DictConfig) -> tuple | None:
    """What the splits of a sweep's job depend on: the data config and, for each file, its path,
    size, modification time and inode (a changed or replaced file is read and checked anew)."""
    from omegaconf import OmegaConf

    if not is_multirun():
        return None
    files = []
    for key in ("train_path", "test_path"):
        path = resolve(cfg.data[key])
        try:
            st = path.stat()
        except OSError:
            return None  # the read below says what is wrong
        files.append((str(path), st.st_size, st.st_mtime_ns, st.st_ino))
    return (OmegaConf.to_yaml(cfg.data, resolve=True), *files)


def run(cfg: DictConfig) -> Splits:
    key = _sweep_key(cfg)
    if key is not None and key in _READ:
        splits = _READ[key]
        log.info("load: the splits an earlier job of this process read and checked (same files and data config)")
        return splits
    splits = _read_and_write(cfg)
    if key is not None:
        _READ.clear()
        _DIGESTS.clear()
        _READ[key] = splits
    return splits


def is_kept(splits: Splits) -> bool:
    """Whether ``splits`` are the ones this process keeps for the next jobs of its sweep."""
    return any(kept is splits for kept in _READ.values())


def _read_and_write(cfg: DictConfig) -> Splits:
    for key in ("train_path", "test_path"):
        path = resolve(cfg.data[key])
        if path.exists():
            verify_dvc_tracked(path)
    shape = tuple(cfg.data.image_shape)
    train_name, test_name = f"data.train_path={cfg.data.train_path}", f"data.test_path={cfg.data.test_path}"
    out = Outputs.of(cfg)
    with H5Images(resolve(cfg.data.train_path), "train", shape, train_name) as train_src, \
            H5Images(resolve(cfg.data.test_path), "test", shape, test_name) as test_src:
        check_both_classes(train_src.y, train_name)
        rows = {"train": (train_src, np.arange(len(train_src))), "test": (test_src, np.arange(len(test_src)))}
        if cfg.data.val_fraction > 0:
            rest, val = stratified_indices(train_src.y, cfg.data.val_fraction,
                                           np.random.default_rng(cfg.data.split_seed))
            rows.update(train=(train_src, rest), val=(train_src, val))
        splits = Splits(**_write_all(out.flat_dir, {name: rows[name] for name in ("train", "val", "test")
                                                    if name in rows}, train_src.features))
    log.info("load: %s; %d features each", ", ".join(
        f"{len(s)} {n} images ({int(s.y.sum())} cats)" for n, s in splits.named()), splits.train.x.shape[1])
    return splits


def _write_all(flat_dir: Path, rows: dict[str, tuple[H5Images, np.ndarray]], features: int) -> dict[str, Split]:
    """Every split's x and y into temporary files, renamed into place only when all images of
    all splits have been read and passed the checks: a bad image anywhere leaves the previous
    outputs as they were. Files of earlier runs that this run does not write go.

    Returns the splits read back from the files this call wrote, opened before they are renamed
    into place: what the later stages of this process read is what this process wrote, even if
    another job writes the same folder meanwhile."""
    import os

    created = [p for p in (flat_dir, *flat_dir.parents) if not p.exists()]  # deepest first
    flat_dir.mkdir(parents=True, exist_ok=True)
    written: dict[Path, Path] = {}
    done = False
    try:
        for name, (src, idx) in rows.items():
            for part, write in (("x", lambda f: write_npy_rows(f, len(idx), features, (
                    src.take(idx[s:s + BLOCK]) for s in range(0, len(idx), BLOCK)))),
                                ("y", lambda f: np.save(f, src.y[idx]))):
                final = flat_dir / f"{name}_{part}.npy"
                tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
                with open(tmp, "wb") as f:
                    written[final] = tmp
                    write(f)
        splits = {name: Split(NpyRows(written[flat_dir / f"{name}_x.npy"], shown_as=flat_dir / f"{name}_x.npy"),
                              load_array(written[flat_dir / f"{name}_y.npy"])) for name in rows}
        for final, tmp in written.items():
            os.replace(tmp, final)
        for stale in [*flat_dir.glob("*.npz"), *flat_dir.glob("*.npy")]:
            if stale not in written:
                stale.unlink()
        done = True
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)
        if not done:  # no trace of a failed load: the folders it made go too
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break
    return splits


def digest(splits: Splits) -> str:
    """md5 of the data a run learns from and is judged on: each split's name, shape, pixels and
    labels as read (the flattened arrays, not the files they came from)."""
    import hashlib

    if id(splits) in _DIGESTS:  # kept splits of a sweep (run): hashed once per process
        return _DIGESTS[id(splits)]
    h = hashlib.md5()
    for name, split in splits.named():
        h.update(f"{name}:{split.x.shape}:{split.x.dtype}".encode())
        for start in range(0, len(split), BLOCK):
            h.update(np.ascontiguousarray(split.x[start:start + BLOCK]).tobytes())
        h.update(np.ascontiguousarray(split.y).tobytes())
    if is_kept(splits):
        _DIGESTS[id(splits)] = h.hexdigest()
    return h.hexdigest()


def sources(cfg: DictConfig) -> dict[str, str]:
    """The data files, relative to the project when they lie in it."""
    out = {}
    for split, key in (("train", "train_path"), ("test", "test_path")):
        path = resolve(cfg.data[key])
        out[split] = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else cfg.data[key]
    return out


def read(cfg: DictConfig) -> Splits:
    """This stage's outputs, for the stages after it: images as NpyRows (read on demand)."""
    out = Outputs.of(cfg)
    names = ["train", "test"] + (["val"] if cfg.data.val_fraction > 0 else [])
    for name in names:
        for part in ("x", "y"):
            if not (out.flat_dir / f"{name}_{part}.npy").is_file():
                raise DataError(f"{out.flat_dir / f'{name}_{part}.npy'}: not found; run the 'load' stage "
                                "first (dvc repro load)")
    return Splits(**{n: Split(NpyRows(out.flat_dir / f"{n}_x.npy"),
                              load_array(out.flat_dir / f"{n}_y.npy")) for n in names})


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    run_cli(run, cfg)


if __name__ == "__main__":
    run_main(main)
