"""Normalization fitted on the training set and applied to any set: x' = (x - shift) / scale."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from catnet.errors import BadValue

METHODS = ("scale", "standardize")


@dataclass(frozen=True)
class Normalizer:
    method: str
    shift: np.ndarray  # (D,) float64, subtracted from every image
    scale: np.ndarray  # (D,) float64, divides every image

    def apply(self, x: np.ndarray, dtype: str | np.dtype = np.float32) -> np.ndarray:
        """(N, D) pixels (an array, or rows read on demand: catnet.npy.NpyRows) -> (N, D)
        network inputs of ``dtype``, a fresh C-contiguous array."""
        out = np.array(x, dtype=np.float64)  # exact for uint8: float32 and float64 runs see the same inputs
        out -= self.shift
        out /= self.scale
        return out.astype(dtype, copy=False)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"method": np.array(self.method), "shift": self.shift, "scale": self.scale}

    @classmethod
    def from_arrays(cls, arrays) -> "Normalizer":
        return cls(method=str(arrays["method"]), shift=arrays["shift"], scale=arrays["scale"])


def fit(x_train: np.ndarray, method: str = "scale", divisor: float = 255.0, eps: float = 1e-8,
        block: int = 256) -> Normalizer:
    """``scale``: divide by ``divisor`` (the seed's x/255). ``standardize``: per-feature mean and
    standard deviation of the training images (features that never vary are only centred),
    accumulated in float64 over ``block`` rows at a time (two passes: mean, then squared
    deviations), so no float copy of the whole set is made."""
    n, d = x_train.shape
    if method == "scale":
        if not 0 < divisor < np.inf:
            raise BadValue("divisor", divisor, "must be a finite number > 0")
        return Normalizer(method, np.zeros(d), np.full(d, float(divisor)))
    if method == "standardize":
        blocks = [slice(s, s + block) for s in range(0, n, block)]
        mean = sum(x_train[b].sum(axis=0, dtype=np.float64) for b in blocks) / n
        var = sum(np.square(x_train[b] - mean).sum(axis=0) for b in blocks) / n
        std = np.sqrt(var)
        return Normalizer(method, mean, np.where(std > eps, std, 1.0))
    raise BadValue("method", method, f"must be one of {', '.join(METHODS)}")
