"""The trained network as an MLflow pyfunc model, logged from code (nothing is pickled).

Input: raw images, a uint8 tensor (N, 64, 64, 3) with values 0..255 (one image (64, 64, 3)
is taken as N=1), exactly what the HDF5 files hold; the model flattens and normalizes them
as the pipeline did. Output: a DataFrame with ``probability`` (of cat) and ``label`` (1 = cat).
The weights (with the activation and image shape they were trained for) and the normalizer
travel as artifacts (.npz, loaded without pickle), the catnet package as code, so loading needs
only numpy, pandas and MLflow.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class CatnetModel(PythonModel):
    def load_context(self, context) -> None:
        from catnet.network import Network
        from catnet.preprocess import Normalizer

        with np.load(context.artifacts["weights"], allow_pickle=False) as f:
            arrays = dict(f)  # W1..WL (b1..bL), the activation and the image shape (pipeline/train.py)
        self.net = Network.from_arrays(arrays)
        self.image_shape = tuple(int(s) for s in arrays["image_shape"])
        self.dtype = self.net.weights[0].dtype
        with np.load(context.artifacts["normalizer"], allow_pickle=False) as f:
            self.normalizer = Normalizer.from_arrays(dict(f))

    # the type hint tells MLflow the input is an array (no schema inferred from it: the logged
    # signature is the (N, 64, 64, 3) uint8 tensor) and silences its "add type hints" warning
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        from catnet.network import predict_proba

        x = np.asarray(model_input)
        if x.shape == self.image_shape:
            x = x[None]
        if x.shape[1:] != self.image_shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.image_shape))}), got {x.shape}")
        if x.dtype.kind not in "uif" or x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError("expected pixel values 0..255")
        proba = predict_proba(self.net, self.normalizer.apply(x.reshape(len(x), -1), self.dtype))
        return pd.DataFrame({"probability": proba.astype(np.float64), "label": (proba >= 0.5).astype(np.int64)})


mlflow.models.set_model(CatnetModel())
