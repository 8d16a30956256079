"""The network as an MLflow model: logged in its run's experiment, registered, loaded.

The model is saved from code (``pipeline/tracking/pyfunc.py``; nothing is pickled) into a folder
private to the run, from the weights and normalizer in memory, so it always holds the
network this run trained and evaluated, whatever else runs beside it. The ``MLmodel`` file
keeps no path of the machine that logged it.
"""

from __future__ import annotations

import contextlib
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


# (image shape, normalizer's arrays) -> the files of a model folder MLflow saved in this process
_TEMPLATES: dict[tuple, dict[str, bytes]] = {}


def log_model(client, run_id: str, experiment_id: str, folder: Path, weights: dict[str, np.ndarray],
              normalizer: dict[str, np.ndarray], example: np.ndarray, params: dict[str, str]) -> str:
    """Log the pyfunc model ``model`` of run ``run_id`` (a LoggedModel of ``experiment_id``,
    linked to the run as its output) and return its URI, ``models:/<model id>``.

    ``weights``: the arrays of weights.npz (with the network's description, see
    catnet.network.Network.to_file_arrays); ``normalizer``: those of normalizer.npz.

    The first model of a process is saved by MLflow (``mlflow.pyfunc.save_model``: the signature,
    the input example checked against it, the requirements, the code); the later ones of the same
    image shape are that folder with their own arrays and ids (``_from_template``), which is what
    MLflow would save for them (tests/test_model.py) at a fraction of the cost: a sweep logs one
    per job."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    model = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id, params=params,
                                       model_type="catnet")
    local = folder / "model"
    key = (example.shape, example.dtype.str, hash(example.tobytes()), tuple(sorted(normalizer)))
    if key in _TEMPLATES:
        _from_template(_TEMPLATES[key], local, weights, normalizer, run_id, model.model_id)
    else:
        _save(folder, local, weights, normalizer, example, run_id, model.model_id)
        _TEMPLATES[key] = {str(f.relative_to(local)): f.read_bytes() for f in local.rglob("*") if f.is_file()}
    client.log_model_artifacts(model.model_id, str(local))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return f"models:/{model.model_id}"


def _save(folder: Path, local: Path, weights: dict[str, np.ndarray], normalizer: dict[str, np.ndarray],
          example: np.ndarray, run_id: str, model_id: str) -> None:
    """The model folder, saved by MLflow."""
    import shutil

    import mlflow
    import pandas
    from mlflow.models import Model, infer_signature

    quiet_model_warnings()
    src = folder / "model-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "weights.npz").write_bytes(weights_bytes(weights))
    (src / "normalizer.npz").write_bytes(weights_bytes(normalizer))
    signature = infer_signature(example, pandas.DataFrame(
        {"probability": np.zeros(len(example)), "label": np.zeros(len(example), np.int64)}))
    requirements = {"numpy": np.__version__, "pandas": pandas.__version__, "mlflow": mlflow.__version__}
    with _known_packages(requirements):
        mlflow.pyfunc.save_model(
            path=str(local), python_model=str(Path(__file__).with_name("pyfunc.py")),
            artifacts={"weights": str(src / "weights.npz"), "normalizer": str(src / "normalizer.npz")},
            code_paths=[str(ROOT / "src" / "catnet")],
            signature=signature, input_example=example,
            pip_requirements=[f"{name}=={version}" for name, version in requirements.items()],
            mlflow_model=Model(run_id=run_id, model_id=model_id, model_uuid=model_id),
        )
    _strip_machine_paths(local / "MLmodel")
    for pycache in local.rglob("__pycache__"):
        shutil.rmtree(pycache, ignore_errors=True)


# what MLmodel says of one model and not of another of the same shape (MLflow's Model.save)
PER_MODEL = ("run_id", "model_id", "model_uuid", "utc_time_created", "model_size_bytes")


def _from_template(template: dict[str, bytes], local: Path, weights: dict[str, np.ndarray],
                   normalizer: dict[str, np.ndarray], run_id: str, model_id: str) -> None:
    """The folder ``_save`` would make: ``template`` (the files of a model MLflow saved in this
    process, of the same image shape) with these arrays, and this run's and model's ids, time and
    size in MLmodel."""
    import datetime

    import yaml

    arrays = {"artifacts/weights.npz": weights_bytes(weights), "artifacts/normalizer.npz": weights_bytes(normalizer)}
    for name, data in {**template, **arrays}.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    doc = yaml.load(template["MLmodel"], Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    # MLflow's count of the folder's bytes (taken part-way through its save): the arrays' sizes differ
    size = doc["model_size_bytes"] + sum(len(data) - len(template[name]) for name, data in arrays.items())
    doc.update(run_id=run_id, model_id=model_id, model_uuid=model_id, model_size_bytes=size,
               utc_time_created=str(datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)))
    (local / "MLmodel").write_text(yaml.dump(doc, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False))


def log_from_files(client, run_id: str, folder: str, params: dict[str, str]) -> str:
    """Log run ``run_id``'s model (with the run's ``params``) from the weights.npz and
    normalizer.npz it logged from ``folder`` (a sweep's job: the process that writes its record
    makes its model, off the job's way), tag the run with its URI and return it."""
    folder_ = Path(folder)
    arrays = {name: _npz(str(folder_ / f"{name}.npz")) for name in ("weights", "normalizer")}
    shape = tuple(int(n) for n in arrays["weights"]["image_shape"])
    example = np.zeros((2, *shape), dtype=np.uint8)  # the signature's example: two black images
    uri = log_model(client, run_id, client.get_run(run_id).info.experiment_id, folder_, arrays["weights"],
                    arrays["normalizer"], example, params)
    client.set_tag(run_id, "catnet.model_uri", uri)
    return uri


@contextlib.contextmanager
def _known_packages(packages):
    """While a model is saved, MLflow knows the modules of ``packages`` only.

    ``save_model`` checks each pip requirement against the installed version, and first maps
    every installed distribution to its modules (``importlib.metadata.packages_distributions``:
    about 0.4 s, once per process). The requirements here are the versions this process
    imported, and each package is its own module: the map of those packages gives MLflow the
    same answer. MLflow's own map is left as it was (not yet made) for anything else."""
    from mlflow.utils import requirements_utils

    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", False) is not None:  # made already, or renamed
        yield
        return
    requirements_utils._MODULES_TO_PACKAGES = {name: [name] for name in packages}
    try:
        yield
    finally:
        requirements_utils._MODULES_TO_PACKAGES = None
        requirements_utils._PACKAGES_TO_MODULES = None


def ensure(client, run) -> str:
    """The model URI of ``run`` (a run that trained): its ``catnet.model_uri``, or, for a run
    that has weights.npz and normalizer.npz but no model (a sweep's child whose model could not be
    logged, or one recorded before every child had one), the model made now from those two
    artifacts, logged as the run's and tagged."""
    import tempfile

    uri = run.data.tags.get("catnet.model_uri")
    if uri:
        return uri
    run_id = run.info.run_id
    with tempfile.TemporaryDirectory(prefix=f"catnet-model-{run_id[:8]}-") as tmp:
        try:
            arrays = {name: _npz(client.download_artifacts(run_id, f"{name}.npz", tmp))
                      for name in ("weights", "normalizer")}
        except Exception as e:  # noqa: BLE001 - MlflowException, OSError: say which run
            raise ConfigError(f"run {run_id}: no model, and its weights.npz and normalizer.npz cannot be read "
                              f"to make one ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        shape = tuple(int(n) for n in arrays["weights"]["image_shape"])
        example = np.zeros((2, *shape), dtype=np.uint8)  # the signature's example: two black images
        uri = log_model(client, run_id, run.info.experiment_id, Path(tmp), arrays["weights"], arrays["normalizer"],
                        example, dict(run.data.params))
    client.set_tag(run_id, "catnet.model_uri", uri)
    return uri


def _npz(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


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

    quiet_model_warnings()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as e:
        hint = ("; pipeline.register run_id=<id> makes the model of a run that logged its weights.npz but has none"
                if model_uri.startswith("runs:/") else "")
        raise ConfigError(f"model_uri={model_uri}: cannot load it ({str(e).splitlines()[0]}){hint}") from None


def quiet_model_warnings() -> None:
    """Drop two MLflow hints that do not apply here: "add type hints to predict" (the model
    validates its input itself) and "integer column(s)" (the label column is never missing).
    MLflow re-enables UserWarnings inside its own calls (a "once" filter put in front of ours),
    so a filter cannot do it; the display hook can."""
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a user's own setting wins
    if getattr(warnings.showwarning, "_catnet", False):
        return
    shown = warnings.showwarning
    hints = ("type hints to the `predict` method", "Inferred schema contains integer column")

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if not any(h in str(message) for h in hints):
            shown(message, category, filename, lineno, file, line)

    showwarning._catnet = True
    warnings.showwarning = showwarning
