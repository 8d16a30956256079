"""Hydra entry points: one module per stage (python -m pipeline.<stage>, what dvc.yaml runs)
and ``python -m pipeline``, which runs all four in one process (what sweeps run)."""

import sys as _sys
from pathlib import Path as _Path

from pipeline import blas as _blas

_blas.choose()  # before NumPy loads OpenBLAS: one kernel and thread count for every entry point

# Hydra finds launchers by walking the folders of the ``hydra_plugins`` namespace; an editable
# install maps the project's launcher package (hydra_plugins/catnet_ray_cluster) by name only, so
# the checkout joins the namespace's folders here, from whatever directory a command runs.
_ROOT = str(_Path(__file__).resolve().parents[1])
if (_Path(_ROOT) / "hydra_plugins").is_dir() and _ROOT not in _sys.path:
    _sys.path.append(_ROOT)
