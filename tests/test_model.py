"""Using a trained model: the pyfunc model, the registry alias, predict on image files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
from conftest import REAL_TEST, needs_data, run_cli, runs_of

from pipeline.common import ROOT

pytestmark = needs_data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two runs with a validation split in a temporary store, and the champion registered."""
    tmp = tmp_path_factory.mktemp("model")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    for epochs in (5, 300):
        run_cli(f"train.epochs={epochs}", "train.check_learned=false", "data.val_fraction=0.2", f"tracking.uri={uri}",
                "tracking.experiment=test", f"paths.out_dir={tmp / f'out{epochs}'}")
    proc = run_cli(f"tracking.uri={uri}", "experiment=test", module="pipeline.register")
    return {"uri": uri, "tmp": tmp, "register": proc.stdout}


def _test_images():
    with h5py.File(REAL_TEST) as f:
        return f["test_set_x"][()], f["test_set_y"][()]


@pytest.mark.slow
def test_logged_model_reproduces_the_network_and_its_accuracy(trained):
    import mlflow

    from catnet.network import Network, predict_proba
    from catnet.preprocess import Normalizer

    client, runs = runs_of(trained["uri"])
    run = next(r for r in runs if r.data.params["train.epochs"] == "300")
    mlflow.set_tracking_uri(trained["uri"])
    model = mlflow.pyfunc.load_model(run.data.tags["catnet.model_uri"])
    assert str(model.metadata.get_input_schema()) == "[Tensor('uint8', (-1, 64, 64, 3))]"
    x, y = _test_images()
    out = model.predict(x)
    out_dir = trained["tmp"] / "out300"
    with np.load(out_dir / "models/weights.npz", allow_pickle=False) as w, \
            np.load(out_dir / "models/normalizer.npz", allow_pickle=False) as n:
        net, norm = Network.from_arrays(dict(w)), Normalizer.from_arrays(dict(n))
    expected = predict_proba(net, norm.apply(x.reshape(50, -1)))
    np.testing.assert_allclose(out["probability"], expected, rtol=1e-6)
    assert (out["label"].to_numpy() == y).mean() == pytest.approx(run.data.metrics["test/accuracy"])
    with pytest.raises(Exception, match="shape"):  # MLflow's schema check comes first
        model.predict(x[:, :32])
    # the model's own check, for inputs that pass the schema (or a model loaded without it)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 64, 64, 3\), got \(50, 32, 64, 3\)"):
        model.unwrap_python_model().predict(None, x[:, :32])
    with pytest.raises(ValueError, match="expected pixel values 0..255"):
        model.unwrap_python_model().predict(None, x.astype(np.int16) - 1)


def test_register_points_the_alias_at_the_best_validation_run(trained):
    from mlflow import MlflowClient

    client, runs = runs_of(trained["uri"])
    best = max(runs, key=lambda r: r.data.metrics["val/balanced_accuracy"])
    registry = MlflowClient(tracking_uri=trained["uri"], registry_uri=trained["uri"])
    version = registry.get_model_version_by_alias("catnet", "champion")
    assert version.run_id == best.info.run_id
    assert f"models:/catnet@champion = version {version.version}" in trained["register"]


def test_predict_on_png_and_jpeg_files_skips_a_bad_one(trained):
    from PIL import Image

    x, y = _test_images()
    folder = trained["tmp"] / "images"
    folder.mkdir()
    names = []
    for i in range(6):
        name = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(x[i]).save(name, quality=95)
        names.append(name)
    (folder / "broken.png").write_text("not an image")
    csv = trained["tmp"] / "pred.csv"
    proc = run_cli(f"tracking.uri={trained['uri']}", f"images=[{folder}]", f"csv={csv}",
                   f"json={trained['tmp'] / 'input.json'}", module="pipeline.predict", check=False)
    assert proc.returncode == 1
    assert f"{folder / 'broken.png'}: error: not an image" in proc.stderr
    lines = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert [p for p, _, _, _ in lines] == [str(n) for n in sorted(names)]
    assert all(label in ("cat", "non-cat") and 0 <= float(p) <= 1 for _, label, p, _ in lines)
    assert {seen for *_, seen in lines} == {"64x64 RGB"}  # nothing converted
    assert csv.read_text().splitlines()[0] == "path,label,probability,seen_as"
    assert csv.read_text().count("\n") == 7
    # the PNG files are lossless: the same answer as the model on the original pixels
    import mlflow

    mlflow.set_tracking_uri(trained["uri"])
    direct = mlflow.pyfunc.load_model("models:/catnet@champion").predict(x[:6])
    by_path = {p: float(pr) for p, _, pr, _ in lines}
    for i in (1, 3, 5):
        assert by_path[str(folder / f"img{i}.png")] == pytest.approx(direct["probability"][i], abs=1e-4)


@pytest.mark.slow
def test_mlflow_models_predict_cli_on_the_champion(trained):
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained["uri"]}
    source = trained["tmp"] / "cli_input.json"  # the format pipeline.predict json=... writes
    source.write_text(json.dumps({"inputs": _test_images()[0][:6].tolist()}))
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "models", "predict", "-m", "models:/catnet@champion",
         "--env-manager", "local", "-i", str(source), "-t", "json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    predictions = json.loads(proc.stdout.strip().splitlines()[-1])["predictions"]
    assert len(predictions) == 6 and {"probability", "label"} <= set(predictions[0])
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]  # e.g. MLflow's "add type hints to predict"


@pytest.mark.slow
def test_predict_takes_one_path_and_says_what_it_converted(trained):
    """``images=<one path>`` without brackets is the list of that path; an image of another size or
    mode is predicted, and its line (and csv=) say what the model saw of it."""
    from PIL import Image

    x, _ = _test_images()
    photo = trained["tmp"] / "photo.png"
    Image.fromarray(x[0]).convert("RGBA").resize((451, 300)).save(photo)
    gray = trained["tmp"] / "gray" / "small.png"
    gray.parent.mkdir()
    Image.fromarray(x[1]).convert("L").save(gray)
    csv = trained["tmp"] / "one.csv"
    for images, expected in ((photo, "resized from 451x300 RGBA"), (gray.parent, "converted from 64x64 L")):
        proc = run_cli(f"tracking.uri={trained['uri']}", f"images={images}", f"csv={csv}", module="pipeline.predict")
        (line,) = proc.stdout.strip().splitlines()
        assert line.split("\t")[3] == expected
        assert csv.read_text().splitlines()[1].endswith(f",{expected}")


@pytest.mark.slow
def test_predict_gives_the_model_the_pixels_of_an_rgba_or_greyscale_image(trained):
    """An RGBA image reaches the model as its RGB channels (alpha dropped), a greyscale one as its
    grey level in each of the three channels: the inputs predict writes (json=) are those pixels,
    and the probabilities it reports (csv=) are the model's for them."""
    import csv as csv_module

    import mlflow
    from PIL import Image

    rng = np.random.default_rng(0)
    x, _ = _test_images()
    rgba = np.concatenate([x[0], rng.integers(0, 256, (64, 64, 1), dtype=np.uint8)], axis=2)
    grey = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    folder = trained["tmp"] / "modes"
    folder.mkdir()
    Image.fromarray(rgba, "RGBA").save(folder / "a_rgba.png")
    Image.fromarray(grey, "L").save(folder / "b_grey.png")
    expected = np.stack([x[0], np.repeat(grey[:, :, None], 3, axis=2)])
    run_cli(f"tracking.uri={trained['uri']}", f"images={folder}", f"json={folder / 'in.json'}",
            f"csv={folder / 'out.csv'}", module="pipeline.predict")
    np.testing.assert_array_equal(np.array(json.loads((folder / "in.json").read_text())["inputs"]), expected)
    with open(folder / "out.csv") as f:
        reported = [float(row["probability"]) for row in csv_module.DictReader(f)]
    mlflow.set_tracking_uri(trained["uri"])
    model = mlflow.pyfunc.load_model("models:/catnet@champion")
    np.testing.assert_allclose(reported, model.predict(expected)["probability"], rtol=1e-12)
    assert reported[0] != reported[1]
