"""Load and validate the cat / non-cat HDF5 files, flatten the images.

Schema (the one the course material ships): a file holds ``<split>_set_x``, images of
shape (N, 64, 64, 3) with pixel values 0..255, and ``<split>_set_y``, N labels in {0, 1}
(1 = cat). A file whose only ``*_set_x`` / ``*_set_y`` pair has another prefix is accepted
too, so any file in the same schema can be used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catnet.errors import DataError
from catnet.network import check_choice


@dataclass(frozen=True)
class Split:
    """One set of images and labels."""

    x: np.ndarray  # (N, H, W, C) uint8 images, or (N, H*W*C) once flattened
    y: np.ndarray  # (N,) uint8 labels, 1 = cat

    def __len__(self) -> int:
        return len(self.y)


def _find_key(keys: list[str], split: str, suffix: str, path: str) -> str:
    preferred = f"{split}_set_{suffix}"
    if preferred in keys:
        return preferred
    candidates = [k for k in keys if k.endswith(f"_set_{suffix}")]
    if len(candidates) == 1:
        return candidates[0]
    raise DataError(
        f"{path}: no dataset '{preferred}' (datasets in file: {', '.join(sorted(keys)) or 'none'})"
    )


def load_split(path: str | Path, split: str, image_shape: tuple[int, ...], name: str | None = None) -> Split:
    """Read and validate one HDF5 file. ``split`` is 'train' or 'test'; ``name`` is how error
    messages call the file (default: its path)."""
    import h5py  # imported here: only the load stage needs it

    path = Path(path)
    shown = name or str(path)
    _check_file(path, shown)
    try:
        with h5py.File(path, "r") as f:
            keys = [k for k in f.keys() if isinstance(f[k], h5py.Dataset)]
            x_key = _find_key(keys, split, "x", shown)
            y_key = _find_key(keys, split, "y", shown)
            x = f[x_key][()]
            y = f[y_key][()]
    except DataError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise DataError(f"{shown}: unreadable HDF5 file (truncated or corrupt?): {e}") from None
    return Split(x=_check_images(x, x_key, shown, image_shape), y=_check_labels(y, y_key, shown, len(x)))


def _check_file(path: Path, shown: str) -> None:
    import h5py

    if not path.exists():
        raise DataError(f"{shown}: file not found")
    if not path.is_file():
        raise DataError(f"{shown}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{shown}: file is empty")
    if not h5py.is_hdf5(path):
        raise DataError(f"{shown}: not an HDF5 file")


def _check_images(x: np.ndarray, key: str, path: str, image_shape: tuple[int, ...]) -> np.ndarray:
    where = f"{path} (dataset '{key}')"
    if x.dtype.kind not in "uif":
        raise DataError(f"{where}: images must be numbers, got dtype {x.dtype}")
    if x.ndim != 1 + len(image_shape) or tuple(x.shape[1:]) != tuple(image_shape):
        raise DataError(
            f"{where}: expected images of shape (N, {', '.join(map(str, image_shape))}), got {x.shape}"
        )
    if len(x) == 0:
        raise DataError(f"{where}: the set is empty (0 images)")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{where}: {int((~np.isfinite(x)).sum())} pixel values are NaN or infinite")
    lo, hi = x.min(), x.max()
    if lo < 0 or hi > 255:
        raise DataError(f"{where}: pixel values must lie in 0..255, found {lo}..{hi}")
    if x.dtype.kind == "f" and not np.array_equal(x, np.round(x)):
        raise DataError(f"{where}: pixel values must be whole numbers 0..255")
    return x.astype(np.uint8, copy=False)


def _check_labels(y: np.ndarray, key: str, path: str, n_images: int) -> np.ndarray:
    where = f"{path} (dataset '{key}')"
    if y.dtype.kind not in "buif":
        raise DataError(f"{where}: labels must be numbers, got dtype {y.dtype}")
    if y.ndim == 2 and 1 in y.shape:  # (1, N) or (N, 1) as some copies store them
        y = y.reshape(-1)
    if y.ndim != 1:
        raise DataError(f"{where}: expected labels of shape (N,), got {y.shape}")
    if len(y) != n_images:
        raise DataError(f"{where}: {len(y)} labels for {n_images} images")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise DataError(f"{where}: labels contain NaN or infinite values")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise DataError(
            f"{where}: labels must be 0 or 1, found {np.unique(y[bad])[:5].tolist()}"
        )
    return y.astype(np.uint8)


def load_dataset(
    train_path: str | Path, test_path: str | Path, image_shape: tuple[int, ...] = (64, 64, 3),
    names: tuple[str, str] | None = None,
) -> tuple[Split, Split]:
    """Load both files and check that they fit together. ``names``: how messages call them."""
    train_name, test_name = names or (str(train_path), str(test_path))
    train = load_split(train_path, "train", image_shape, train_name)
    test = load_split(test_path, "test", image_shape, test_name)
    check_both_classes(train.y, train_name)
    return train, test


def check_both_classes(y: np.ndarray, name: str) -> None:
    """A training set needs cats and non-cats."""
    if len(np.unique(y)) < 2:
        raise DataError(f"{name}: the training set holds only label {int(y[0])}; both classes are needed")


def flatten(split: Split) -> Split:
    """(N, H, W, C) -> (N, H*W*C), row-major: the pixel triples in order."""
    return Split(x=np.ascontiguousarray(split.x.reshape(len(split.x), -1)), y=split.y)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dir_md5(entries: list[dict]) -> str:
    entries = sorted(entries, key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries).encode()).hexdigest()


def dvc_digest(paths: list[str | Path]) -> str:
    """The md5 DVC gives a directory holding exactly these files (``<md5>.dir`` without suffix).

    For the files of ``data/raw`` this equals the md5 in ``data/raw.dvc``.
    """
    return _dir_md5([{"md5": _md5(Path(p)), "relpath": Path(p).name} for p in paths])


def dvc_dir_digest(directory: str | Path) -> str:
    """The md5 ``dvc add <directory>`` would record for the directory as it is now."""
    directory = Path(directory)
    files = [p for p in directory.rglob("*") if p.is_file()]
    return _dir_md5([{"md5": _md5(p), "relpath": p.relative_to(directory).as_posix()} for p in files])


def stratified_split(split: Split, fraction: float, rng: np.random.Generator) -> tuple[Split, Split]:
    """Carve a validation set of about ``fraction`` of the images out of ``split``, keeping the
    share of each class; every class keeps at least one image on each side. Order is kept."""
    rest, val = stratified_indices(split.y, fraction, rng)
    return Split(split.x[rest], split.y[rest]), Split(split.x[val], split.y[val])


def stratified_indices(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The increasing indices (rest, validation) of stratified_split."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    val_idx = []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        n_val = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
        val_idx.append(rng.permutation(idx)[:n_val])
    is_val = np.zeros(len(y), dtype=bool)
    is_val[np.concatenate(val_idx)] = True
    if is_val.all() or not is_val.any():
        raise DataError(f"cannot carve a validation set of {fraction} from {len(y)} images")
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def stratified_folds(y: np.ndarray, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of ``k`` validation folds that each keep the share of each class; every
    index is in exactly one fold."""
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    folds: list[list[np.ndarray]] = [[] for _ in range(k)]
    for label in np.unique(y):
        for i, part in enumerate(np.array_split(rng.permutation(np.flatnonzero(y == label)), k)):
            folds[i].append(part)
    return [np.sort(np.concatenate(f)) for f in folds]


class H5Images:
    """The images of one HDF5 file read on demand, so training can stream mini-batches from
    a file larger than memory. The labels (small) are read and checked at once; images are
    checked batch by batch as they are read.

        with H5Images(path, "train", (64, 64, 3)) as src:
            x = src.take(np.array([5, 2, 9]))  # (3, 12288) uint8, rows in the order asked
    """

    def __init__(self, path: str | Path, split: str, image_shape: tuple[int, ...], name: str | None = None):
        import h5py

        self.path = Path(path)
        self.name = name or str(path)
        _check_file(self.path, self.name)
        try:
            self.file = h5py.File(self.path, "r")
            keys = [k for k in self.file.keys() if isinstance(self.file[k], h5py.Dataset)]
        except (OSError, KeyError, RuntimeError, ValueError) as e:
            raise DataError(f"{self.name}: unreadable HDF5 file (truncated or corrupt?): {e}") from None
        x_key, y_key = _find_key(keys, split, "x", self.name), _find_key(keys, split, "y", self.name)
        self.images = self.file[x_key]
        if self.images.dtype.kind not in "uif":
            raise DataError(f"{self.name} (dataset '{x_key}'): images must be numbers, got dtype {self.images.dtype}")
        if self.images.ndim != 1 + len(image_shape) or tuple(self.images.shape[1:]) != tuple(image_shape):
            raise DataError(f"{self.name} (dataset '{x_key}'): expected images of shape "
                            f"(N, {', '.join(map(str, image_shape))}), got {self.images.shape}")
        if len(self.images) == 0:
            raise DataError(f"{self.name} (dataset '{x_key}'): the set is empty (0 images)")
        self.y = _check_labels(self._read(self.file[y_key], ()), y_key, self.name, len(self.images))
        self.x_key = x_key
        self.features = int(np.prod(image_shape))

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` as (len(idx), features) uint8, in the order of ``idx``."""
        idx = np.asarray(idx)
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        if len(sorted_idx) and sorted_idx[-1] - sorted_idx[0] + 1 == len(sorted_idx):  # a run of rows:
            raw = self._read(self.images, slice(int(sorted_idx[0]), int(sorted_idx[-1]) + 1))  # one read
        else:
            raw = self._read(self.images, sorted_idx)  # HDF5 wants increasing indices
        raw = _check_images(raw, self.x_key, self.name, tuple(self.images.shape[1:]))
        out = np.empty((len(idx), self.features), dtype=np.uint8)
        out[order] = raw.reshape(len(idx), -1)
        return out

    def _read(self, dataset, key):
        try:
            return dataset[key]
        except (OSError, KeyError, RuntimeError, ValueError) as e:
            raise DataError(f"{self.name}: unreadable HDF5 file (truncated or corrupt?): {e}") from None

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "H5Images":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NpyRows:
    """The rows of a 2-D ``.npy`` file, read on demand: ``rows[i:j]``, ``rows[indices]`` and
    ``rows[mask]`` return arrays, ``np.asarray(rows)`` the whole matrix. Reads go through
    ``os.preadv`` into fresh arrays, not a memory map (whose pages would stay resident), so a
    stage that works batch by batch holds one batch."""

    def __init__(self, path: str | Path, shown_as: str | Path | None = None):
        import os

        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if len(shape) != 2 or fortran:
            raise DataError(f"{self.path}: expected a 2-D row-major array, got shape {shape}")
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.ndim = 2
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)
        self.path = Path(shown_as or path)  # how errors name it (the file may be renamed once open)

    def __len__(self) -> int:
        return self.shape[0]

    def _read_into(self, out: np.ndarray, first_row: int) -> None:
        import os

        view, pos = memoryview(out).cast("B"), 0
        while pos < len(view):
            n = os.preadv(self._fd, [view[pos:]], self.offset + first_row * self.row_bytes + pos)
            if n == 0:
                raise DataError(f"{self.path}: file ends early (truncated?)")
            pos += n

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                out = np.empty((max(stop - start, 0), self.shape[1]), dtype=self.dtype)
                if len(out):
                    self._read_into(out, start)
                return out
            key = np.arange(start, stop, step)
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if idx.ndim != 1:
            raise TypeError(f"NpyRows takes a slice, a 1-D index array or a mask, not {key!r}")
        idx = np.where(idx < 0, idx + len(self), idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((len(idx), self.shape[1]), dtype=self.dtype)
        for row, i in enumerate(idx):
            self._read_into(out[row], int(i))
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def close(self) -> None:
        import os

        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


AUGMENTATIONS = ("hflip",)


def hflip(x, image_shape: tuple[int, ...]) -> np.ndarray:
    """Flat images (N, H*W*C) mirrored left to right: pixel (r, c) moves to (r, W-1-c)."""
    x = np.asarray(x)
    return np.ascontiguousarray(x.reshape(len(x), *image_shape)[:, :, ::-1]).reshape(x.shape)


class Mirrored:
    """The N training images followed by their left-right mirror images: 2N rows, each made
    when it is read (rows[indices], rows[i:j], np.asarray(rows)), from an array or rows read on
    demand (NpyRows), so mini-batch training still holds one batch. Labels: np.tile(y, 2)."""

    def __init__(self, rows, image_shape: tuple[int, ...]):
        self.rows, self.image_shape = rows, tuple(image_shape)
        n, d = rows.shape
        self.shape, self.dtype, self.ndim = (2 * n, d), rows.dtype, 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        idx = np.arange(len(self))[key]
        if idx.ndim != 1:
            raise TypeError(f"Mirrored takes a slice, a 1-D index array or a mask, not {key!r}")
        n = len(self.rows)
        out = np.asarray(self.rows[idx % n])
        flip = idx >= n
        if flip.any():
            out[flip] = hflip(out[flip], self.image_shape)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = np.asarray(self.rows)
        whole = np.concatenate([rows, hflip(rows, self.image_shape)])
        return whole if dtype is None else whole.astype(dtype, copy=False)


def augment(x, y: np.ndarray, method: str | None, image_shape: tuple[int, ...]):
    """Training images and labels with ``method`` applied: None leaves them as they are;
    ``hflip`` adds each image mirrored left to right (2N images, a cat stays a cat). Only ever
    for the images a network trains on: validation and test images are never augmented."""
    if method is None:
        return x, y
    check_choice("train.augment", method, AUGMENTATIONS)
    return Mirrored(x, image_shape), np.tile(np.asarray(y), 2)


def write_npy_rows(f, n_rows: int, n_cols: int, blocks, dtype=np.uint8) -> None:
    """Write a 2-D (n_rows, n_cols) ``.npy`` to the open binary file ``f`` from an iterable of
    row blocks, so the whole matrix never has to be in memory."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": (n_rows, n_cols)}
    np.lib.format.write_array_header_1_0(f, header)
    written = 0
    for block in blocks:
        block = np.ascontiguousarray(block, dtype=dtype)
        f.write(block.tobytes())
        written += len(block)
    if written != n_rows:
        raise ValueError(f"wrote {written} rows, announced {n_rows}")
