"""catnet: a from-scratch backpropagation network that tells cats from non-cats.

The library is pure NumPy (plus h5py for loading). It knows nothing of configuration,
experiment tracking or data versioning: those live in ``pipeline/``.
"""

from catnet.errors import CatnetError, ConfigError, DataError, TrainingDiverged

__all__ = ["CatnetError", "ConfigError", "DataError", "TrainingDiverged"]
__version__ = "0.1.0"
