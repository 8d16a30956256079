"""Training-set augmentation: images mirrored left to right, made when they are read."""

from __future__ import annotations

import numpy as np

from catnet.errors import check_choice

AUGMENTATIONS = ("hflip",)


def hflip(x, image_shape: tuple[int, ...]) -> np.ndarray:
    """Flat images (N, H*W*C) mirrored left to right: pixel (r, c) moves to (r, W-1-c)."""
    x = np.asarray(x)
    return np.ascontiguousarray(x.reshape(len(x), *image_shape)[:, :, ::-1]).reshape(x.shape)


class Mirrored:
    """The N training images followed by their left-right mirror images: 2N rows, each made
    when it is read (rows[indices], rows[i:j], np.asarray(rows)), from an array or rows read on
    demand (catnet.npy.NpyRows), so mini-batch training still holds one batch. Labels: np.tile(y, 2)."""

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
    check_choice("augment", method, AUGMENTATIONS)
    return Mirrored(x, image_shape), np.tile(np.asarray(y), 2)
