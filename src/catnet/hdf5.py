"""Read and validate the cat / non-cat HDF5 files, flatten the images.

Schema (the one the course material ships): a file holds ``<split>_set_x``, images of
shape (N, 64, 64, 3) with pixel values 0..255, and ``<split>_set_y``, N labels in {0, 1}
(1 = cat). A file whose only ``*_set_x`` / ``*_set_y`` pair has another prefix is accepted
too, so any file in the same schema can be used. ``load_split`` reads a whole file;
``H5Images`` reads its images on demand, for sets larger than memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catnet.errors import DataError


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
        """Rows ``idx`` as (len(idx), features) uint8, in the order of ``idx``; an index may repeat."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"{self.name}: row index out of range for {len(self)} images")
        if not len(idx):
            return np.empty((0, self.features), dtype=np.uint8)
        wanted, where = np.unique(idx, return_inverse=True)  # HDF5 reads increasing, distinct indices
        if len(wanted) and wanted[-1] - wanted[0] + 1 == len(wanted):  # a run of rows: one read
            raw = self._read(self.images, slice(int(wanted[0]), int(wanted[-1]) + 1))
        else:
            raw = self._read(self.images, wanted)
        raw = _check_images(raw, self.x_key, self.name, tuple(self.images.shape[1:]))
        return np.ascontiguousarray(raw.reshape(len(wanted), -1)[where])

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
