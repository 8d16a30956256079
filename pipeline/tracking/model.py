"""The network as an MLflow model: logged in its run's experiment, registered, loaded.

The model is saved from code (``pipeline/tracking/pyfunc.py``; nothing is pickled) into a folder
private to the run, from the weights and normalizer in memory, so it always holds the
network this run trained and evaluated, whatever else runs beside it. The ``MLmodel`` file
keeps no path of the machine that logged it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from catnet.errors import ConfigError
from pipeline.common import ROOT

MODEL_NAME = "model"  # runs:/<run id>/model


def weights_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def log_model(client, run_id: str, folder: Path, weights: dict[str, np.ndarray], normalizer: dict[str, np.ndarray],
              example: np.ndarray | None = None) -> str:
    """Log the pyfunc model ``model`` of run ``run_id`` (a LoggedModel of the run's experiment,
    linked to the run as its output, with the run's params) and return its URI, ``models:/<model id>``.

    ``weights``: the arrays of weights.npz (with the network's description, see
    catnet.network.Network.to_file_arrays); ``normalizer``: those of normalizer.npz; ``example``:
    raw images for the model's input example (default: two black images). MLflow
    saves the model (``mlflow.pyfunc.save_model``) into ``folder``, private to the run, and the
    client logs that folder as the model's artifacts."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                       params=dict(run.data.params), model_type="catnet")
    local = folder / "model"
    save(folder, local, weights, normalizer, example, Model(run_id=run_id, model_id=model.model_id))
    client.log_model_artifacts(model.model_id, str(local))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return f"models:/{model.model_id}"


def signature(image_shape: tuple[int, ...]):
    """Raw uint8 images (N, *image_shape) in; a table of ``probability`` (float) and ``label``
    (int) out. Declared, not inferred from an example: nothing to validate, nothing to warn of."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *image_shape))]),
                          outputs=Schema([ColSpec("double", "probability"), ColSpec("long", "label")]))


def save(folder: Path, local: Path, weights: dict[str, np.ndarray], normalizer: dict[str, np.ndarray],
         example: np.ndarray | None = None, mlflow_model=None) -> None:
    """The model folder ``local``, saved by MLflow from code, with its pinned requirements."""
    import shutil

    import mlflow
    import pandas

    src = folder / "model-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "weights.npz").write_bytes(weights_bytes(weights))
    (src / "normalizer.npz").write_bytes(weights_bytes(normalizer))
    shape = tuple(int(n) for n in weights["image_shape"])
    requirements = {"numpy": np.__version__, "pandas": pandas.__version__, "mlflow": mlflow.__version__}
    mlflow.pyfunc.save_model(
        path=str(local), python_model=str(Path(__file__).with_name("pyfunc.py")),
        artifacts={"weights": str(src / "weights.npz"), "normalizer": str(src / "normalizer.npz")},
        code_paths=[str(ROOT / "src" / "catnet")],
        signature=signature(shape), input_example=np.zeros((2, *shape), np.uint8) if example is None else example,
        pip_requirements=[f"{name}=={version}" for name, version in requirements.items()],
        mlflow_model=mlflow_model,
    )
    _strip_machine_paths(local / "MLmodel")
    for pycache in local.rglob("__pycache__"):
        shutil.rmtree(pycache, ignore_errors=True)


def ensure(client, run) -> str:
    """The model URI of ``run``, a run that trained (every such run logs its model before it is
    FINISHED): its tag ``catnet.model_uri``."""
    uri = run.data.tags.get("catnet.model_uri")
    if not uri:
        raise ConfigError(f"run {run.info.run_id}: it has no model (no tag catnet.model_uri); pick a run that "
                          "trained: python -m pipeline.compare lists them")
    return uri


def _strip_machine_paths(mlmodel: Path) -> None:
    """MLflow writes where the artifacts and the model's code came from (absolute paths of
    this machine); loading needs only the paths inside the model folder."""
    import yaml

    doc = yaml.safe_load(mlmodel.read_text())
    pyfunc = doc["flavors"]["python_function"]
    for artifact in (pyfunc.get("artifacts") or {}).values():
        artifact.pop("uri", None)
    if "model_code_path" in pyfunc:
        pyfunc["model_code_path"] = os.path.basename(pyfunc["model_code_path"])
    doc.pop("artifact_path", None)
    mlmodel.write_text(yaml.safe_dump(doc, sort_keys=False))


def register(client, model_uri: str, run_id: str, name: str, alias: str, tags: dict[str, str]):
    """Register the model at ``model_uri`` (``models:/<model id>``) under ``name`` (once per
    model) and point ``alias`` at that version; return the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="catnet: cat / non-cat classifier")
    model_id = model_uri.removeprefix("models:/")
    same = [v for v in client.search_model_versions(f"name='{name}'")
            if v.source == model_uri or getattr(v, "model_id", None) == model_id]
    if same:
        version = same[0]
    else:
        version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags, model_id=model_id)
    client.set_registered_model_alias(name, alias, version.version)
    return version


def load(model_uri: str):
    """The pyfunc model at any MLflow model URI (the store is the one ``store.client`` set)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as e:
        hint = ("; pipeline.register run_id=<id> makes the model of a run that logged its weights.npz but has none"
                if model_uri.startswith("runs:/") else "")
        raise ConfigError(f"model_uri={model_uri}: cannot load it ({str(e).splitlines()[0]}){hint}") from None
