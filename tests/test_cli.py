"""The pipeline as a user runs it: the CLI on the real data, a temporary MLflow store."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_TRAIN, make_images, needs_data, read_json, run_cli, runs_of, write_h5

from pipeline.common import ROOT


pytestmark = needs_data


def test_one_process_run_is_fully_recorded(store):
    proc = run_cli("train.epochs=30", "train.check_learned=false", "model.hidden_sizes=[6,3]", *store["args"])
    assert "load: 209 train images" in proc.stderr + proc.stdout
    client, runs = runs_of(store["uri"])
    assert len(runs) == 1
    run = runs[0]
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_sizes"] == "[6, 3]"
    assert run.data.params["train.epochs"] == "30" and run.data.params["model.activation"] == "sigmoid"
    history = client.get_metric_history(rid, "train/error")
    assert sorted(m.step for m in history) == list(range(1, 31))
    for key in ("train/accuracy", "test/accuracy", "test/error", "test/precision", "test/recall"):
        assert key in run.data.metrics
    assert run.info.run_name == "epochs=30 check_learned=false hidden=[6,3]"
    # the tags and input that make the run reproducible
    digest = run.data.tags["catnet.data.md5"]  # of the arrays used (tests/test_record.py checks its value)
    assert len(digest) == 32 and run.inputs.dataset_inputs[0].dataset.digest == digest
    assert len(run.data.tags.get("mlflow.source.git.commit", "")) == 40 and " threads" in run.data.tags["catnet.blas"]
    names = {a.path for a in client.list_artifacts(rid)}
    assert {"weights.npz", "config.yaml", "learning_curve.png"} <= names
    local = client.download_artifacts(rid, "weights.npz", str(store["out"].parent))
    with np.load(local, allow_pickle=False) as w:
        assert sorted(w) == ["W1", "W2", "W3", "activation", "image_shape"]
        assert str(w["activation"]) == "sigmoid" and w["image_shape"].tolist() == [64, 64, 3]
        assert [w[k].shape for k in ("W1", "W2", "W3")] == [(12288, 6), (6, 3), (3, 1)]
        assert w["W1"].dtype == np.float32
    metrics = read_json(store["out"] / "reports/metrics.json")
    assert metrics["test"]["accuracy"] == pytest.approx(run.data.metrics["test/accuracy"])
    assert sum(metrics["test"]["confusion"].values()) == 50
    assert (store["out"] / "reports/train_history.csv").read_text().count("\n") == 31


@pytest.mark.slow
def test_stages_in_separate_processes_share_one_run(store):
    for stage in ("load", "normalize", "train", "evaluate"):
        run_cli("train.epochs=5", "train.check_learned=false", "model.hidden_sizes=[4,2]", *store["args"], module=f"pipeline.{stage}")
    client, runs = runs_of(store["uri"])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/error")) == 5
    assert "test/accuracy" in runs[0].data.metrics


def _independent_gradients(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """dE/dW for E = 1/2 sum (y - h)^2, sigmoid everywhere, no bias, written out unit by unit
    in the textbook form, separately from catnet.network."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    outs = [x]
    for w in weights:
        outs.append(sig(outs[-1] @ w))
    delta = -(y - outs[-1]) * outs[-1] * (1 - outs[-1])  # dE/dnet at the output
    grads = []
    for l in range(len(weights) - 1, -1, -1):
        grads.insert(0, outs[l].T @ delta)
        delta = (delta @ weights[l].T) * outs[l] * (1 - outs[l])
    return grads


def test_cli_weights_follow_the_textbook_gradient(tmp_path):
    """Weights after epoch 1 and 2 (float64): W(2) = W(1) - lr * dE/dW at W(1)."""
    import h5py

    lr, w = 0.005, {}
    for epochs in (1, 2):
        out = tmp_path / f"e{epochs}"
        run_cli(f"train.epochs={epochs}", "train.dtype=float64", f"train.lr={lr}", "tracking.enabled=false",
                f"paths.out_dir={out}")
        with np.load(out / "models/weights.npz", allow_pickle=False) as f:
            w[epochs] = [f[f"W{i}"] for i in range(1, 4)]
    with h5py.File(REAL_TRAIN) as f:
        x = f["train_set_x"][()].reshape(209, -1) / 255.0
        y = f["train_set_y"][()].reshape(-1, 1).astype(np.float64)
    grads = _independent_gradients(w[1], x, y)
    for w1, w2, g in zip(w[1], w[2], grads):
        step = (w1 - w2) / lr
        assert np.linalg.norm(step - g) / np.linalg.norm(g) < 1e-6


def test_same_seed_gives_identical_weights(tmp_path):
    arrays = []
    for name in ("a", "b"):
        run_cli("train.epochs=20", "train.check_learned=false", "tracking.enabled=false", f"paths.out_dir={tmp_path / name}")
        with np.load(tmp_path / name / "models/weights.npz", allow_pickle=False) as f:
            arrays.append({k: f[k] for k in f})
    assert all(np.array_equal(arrays[0][k], arrays[1][k]) for k in arrays[0])


@pytest.mark.slow
def test_runs_on_another_dataset_in_the_same_schema(tmp_path, store):
    rng = np.random.default_rng(5)
    train = write_h5(tmp_path / "mine_train.h5", *make_images(30, rng), "train")
    test = write_h5(tmp_path / "mine_test.h5", *make_images(10, rng), "test")
    run_cli(f"data.train_path={train}", f"data.test_path={test}", "train.epochs=40", "train.check_learned=false", *store["args"])
    metrics = read_json(store["out"] / "reports/metrics.json")
    assert sum(metrics["test"]["confusion"].values()) == 10
    _, runs = runs_of(store["uri"])
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["data.train_path"] == str(train)


@pytest.mark.parametrize("args, expected", [
    (["data.train_path=missing.h5"], "data.train_path=missing.h5: file not found"),
    (["data.test_path=dvc.yaml"], "data.test_path=dvc.yaml: not an HDF5 file"),
    (["train.lr=-1"], "train.lr=-1.0: must be a finite number > 0"),
    (["train.epochs=0"], "train.epochs=0: must be >= 1"),
    (["model.hidden_sizes=[]"], "model.hidden_sizes=[]: must list at least one layer width"),
    (["model.activation=gelu"], "model.activation='gelu': must be one of"),
    (["data.split_seed=-1", "data.val_fraction=0.2"], "data.split_seed=-1: must be >= 0"),
    (["normalize.divisor=inf"], "normalize.divisor=inf: must be a finite number > 0"),
    # known only once the data is read: the library's parameter, reported under its config key
    (["data.cv_folds=300"], "data.cv_folds=300: more folds than the 72 images of class 1"),
    (["train.lr=1e9", "train.epochs=20"], "training failed after epoch 20: the network gives every training "
                                          "image the same output"),
])
def test_bad_input_fails_cleanly(store, args, expected):
    proc = run_cli(*args, *store["args"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"catnet: error: {expected}")
    assert "Traceback" not in proc.stderr
    if "training failed" in expected:  # the advice names the config keys, not the library's names
        assert proc.stderr.strip().endswith("try a smaller train.lr or more train.epochs")
    assert not (store["out"] / "models/weights.npz").exists()
    _, runs = runs_of(store["uri"])
    assert all(r.info.status != "FINISHED" for r in runs)


def test_wrong_type_fails_before_any_work(store):
    proc = run_cli("train.lr=abc", *store["args"], check=False)
    assert proc.returncode != 0 and "train.lr" in proc.stderr and "Traceback" not in proc.stderr
    assert not store["out"].exists()


@pytest.mark.slow
def test_minibatch_mode_through_the_cli(store):
    run_cli("train.batch_size=64", "train.epochs=3", "train.check_learned=false", *store["args"])
    client, runs = runs_of(store["uri"])
    assert runs[0].info.status == "FINISHED" and runs[0].data.params["train.batch_size"] == "64"
    assert len(client.get_metric_history(runs[0].info.run_id, "train/error")) == 3


@pytest.mark.slow
def test_long_runs_log_every_kth_epoch_to_mlflow_and_every_epoch_to_the_csv(store):
    from pipeline.train import epoch_stride

    assert [epoch_stride(e, 10000) for e in (1000, 10000, 10001, 300000)] == [1, 1, 2, 30]
    assert epoch_stride(300000, None) == 1
    run_cli("train.epochs=25", "train.check_learned=false", "tracking.max_epoch_points=10", *store["args"])
    client, runs = runs_of(store["uri"])
    steps = sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/error"))
    assert steps == [3, 6, 9, 12, 15, 18, 21, 24, 25]  # every 3rd and the last
    rows = (store["out"] / "reports/train_history.csv").read_text().splitlines()
    assert len(rows) == 1 + 25
    assert runs[0].data.metrics["train/error"] == pytest.approx(float(rows[-1].split(",")[1]), rel=1e-6)


@pytest.mark.slow
def test_hflip_augmentation_trains_on_twice_the_images(store):
    proc = run_cli("train.augment=hflip", "train.epochs=3", "train.check_learned=false", "model.hidden_sizes=[4,2]", "data.cv_folds=2",
                   *store["args"])
    out = proc.stdout + proc.stderr
    assert "418 images" in out and "+hflip" in out  # 209 and their mirror images
    client, runs = runs_of(store["uri"])
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["train.augment"] == "hflip"
    assert {"cv/accuracy", "train/accuracy", "test/accuracy"} <= set(run.data.metrics)
    metrics = read_json(store["out"] / "reports/metrics.json")  # evaluated on the images as they are
    assert sum(metrics["train"]["confusion"].values()) == 209


@pytest.mark.slow
def test_hflip_full_batch_and_one_mini_batch_train_the_same_network(tmp_path):
    """Mini-batch mode reads the mirrored images on demand, full batch all at once: with one
    batch holding all 418 they must make the same updates (float64, the direct update)."""
    weights = []
    for mode in ("train.batch_size=null", "train.batch_size=1000"):
        out = tmp_path / mode.split("=")[1]
        run_cli("train.augment=hflip", mode, "train.epochs=5", "train.check_learned=false", "train.dtype=float64", "train.solver=primal",
                "model.hidden_sizes=[4,2]", "tracking.enabled=false", f"paths.out_dir={out}")
        with np.load(out / "models/weights.npz") as w:
            weights.append({k: w[k] for k in w})
    for k in (k for k in weights[0] if k.startswith(("W", "b"))):
        np.testing.assert_allclose(weights[1][k], weights[0][k], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ending", ["returns", "exits 2"])
def test_an_entry_point_freezes_what_is_alive_before_the_interpreter_exits(ending):
    """The exit's garbage collections skip the objects left by MLflow and its store (about 1 s
    of every tracked command otherwise), whether the command succeeds or exits with an error."""
    import gc

    from pipeline.common import run_main

    def main():
        if ending == "exits 2":
            raise SystemExit(2)

    before = gc.get_freeze_count()
    try:
        with pytest.raises(SystemExit) if ending == "exits 2" else contextlib.nullcontext():
            run_main(main)
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def test_the_process_age_in_the_train_log_is_measured_from_the_process_start():
    """train's log says when the first epoch was done after the process started (the benchmark
    reads it): within 0.1 s of the age a parent measures from just before it started the child."""
    import subprocess
    import sys
    import time

    from pipeline.common import ROOT

    code = "import time; from pipeline.train import process_age; print(process_age(), time.time())"
    spawned = time.time()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    age, now = map(float, out.stdout.split())
    assert 0.0 < age <= now - spawned + 0.02 and age > now - spawned - 0.1


def test_the_benchmark_measures_tracking_through_the_current_tracking_package():
    """make bench times the training loop with and without MLflow logging through the tracking
    package; it broke unseen once when that package's interface changed."""
    from benchmarks import bench

    x, y = bench.load_real("float32")
    times = bench.tracking_overhead(x, y, epochs=5, repeats=1)
    assert set(times) == {"on", "off", "write"} and all(t > 0 for t in times.values())


@pytest.mark.slow
def test_the_sweep_benchmark_times_catnet_beside_the_frameworks_floor(tmp_path):
    """make bench's sweep table, on a small scale: every figure measured (no command failed), and
    the floor's tracked commands leave the least record: a FINISHED run per job, its params and
    1000 points, no sweep parent."""
    import re
    import subprocess
    import sys

    from pipeline.common import ROOT

    out = subprocess.run([sys.executable, "-m", "benchmarks.sweeps", "--rounds", "1", "--jobs", "2",
                          "--long-epochs", "50"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line[:40].strip(): re.findall(r"\d+\.\d+", line[40:]) for line in out.stdout.splitlines()}
    for label in ("per extra job, sequential sweep (s)", "one run, python -m pipeline (s)",
                  "2-job sequential sweep (s)"):
        assert len(rows[label]) >= 4, out.stdout  # tracked, untracked, floor on, floor off (then goals)
    assert all(float(v) > 0 for v in rows["one run, python -m pipeline (s)"][:4])
    assert len(rows["tracked / untracked, 2-job sweep"]) >= 2, out.stdout  # catnet's ratio, the floor's

    uri = f"sqlite:///{tmp_path / 'floor.db'}"
    subprocess.run([sys.executable, "-m", "benchmarks.floor", "-m", "seed=0,1", "~hydra.callbacks.mlflow_sweep",
                    f"tracking.uri={uri}", "tracking.experiment=test", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    client, runs = runs_of(uri)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    assert all(r.data.params["seed"] in ("0", "1") and "mlflow.parentRunId" not in r.data.tags for r in runs)
    assert len(client.get_metric_history(runs[0].info.run_id, "train/error")) == 1000


def test_a_run_from_another_directory_leaves_the_dvc_outputs_and_that_directory_alone(tmp_path):
    """``python -m pipeline`` is an experiment, not the pipeline's DVC stages: it writes its outputs
    and Hydra's files under the project's outputs/ folder, whatever directory it runs from, and
    leaves models/, reports/ and the directory it ran from as they were (its record is MLflow's)."""
    import os
    import subprocess
    import sys

    from pipeline.common import ROOT

    stage_outputs = [ROOT / p for p in ("models/weights.npz", "models/normalizer.npz", "reports/metrics.json",
                                        "reports/train_history.csv", "reports/learning_curve.png", "data/flat")]
    before = {p: p.stat().st_mtime_ns for p in stage_outputs if p.exists()}
    runs_before = set((ROOT / "outputs").glob("*/*"))
    here = tmp_path / "elsewhere"
    here.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    mark = f"seed={os.getpid()}"  # tells this run's folder from others made meanwhile
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train.epochs=5", "train.check_learned=false",
                           "tracking.enabled=false", mark], cwd=here, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(here.iterdir()) == []  # no outputs/ (or anything else) where it ran
    assert {p: p.stat().st_mtime_ns for p in stage_outputs if p.exists()} == before
    (new,) = [d for d in set((ROOT / "outputs").glob("*/*")) - runs_before
              if (d / ".hydra" / "overrides.yaml").exists() and mark in (d / ".hydra" / "overrides.yaml").read_text()]
    assert (new / ".hydra" / "config.yaml").exists() and (new / "models" / "weights.npz").exists()
    assert (new / "reports" / "metrics.json").exists()


@pytest.mark.parametrize("how", ["python -m pipeline", "the DVC stages"])
def test_standardize_is_fitted_on_the_training_images_only(tmp_path, how):
    """The normalizer's mean and spread come from the 209 training images, never the test set,
    whether the stages run in one process or as DVC runs them (expected values: numpy on the file)."""
    import h5py

    with h5py.File(REAL_TRAIN) as f:
        train = f["train_set_x"][()].reshape(209, -1).astype(np.float64)
    args = ["normalize=standardize", "tracking.enabled=false", f"paths.out_dir={tmp_path}"]
    if how == "python -m pipeline":
        run_cli(*args, "train.epochs=2", "train.check_learned=false")
    else:
        run_cli(*args, module="pipeline.load")
        run_cli(*args, module="pipeline.normalize")
    with np.load(tmp_path / "models/normalizer.npz", allow_pickle=False) as n:
        np.testing.assert_allclose(n["shift"], train.mean(axis=0), rtol=1e-9)
        np.testing.assert_allclose(n["scale"], train.std(axis=0), rtol=1e-9)


def test_a_run_records_which_blas_computed_it_and_with_how_many_threads():
    """catnet.blas: threadpoolctl's report (library, version, kernel) and the threads BLAS may use
    when the run opens, which the sums, and so the weights' last bits, may depend on."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from pipeline.provenance import blas

    lib = next(i for i in threadpool_info() if i["user_api"] == "blas")
    with threadpool_limits(limits=1):
        one = blas()
    assert one.startswith(f"{lib['internal_api']} {lib['version']}") and one.endswith(" 1 threads"), one
    assert blas().endswith(f" {lib['num_threads']} threads")


@pytest.mark.slow
def test_every_entry_point_gives_the_same_weights_whatever_kernel_the_cpu_would_pick(tmp_path):
    """One config, one seed, one machine: the same bits from the DVC stages (their commands as
    dvc.yaml has them), python -m pipeline, and a sweep's job on the basic and on the joblib
    launcher (jobs side by side), started from a shell that chose no BLAS kernel or thread count,
    on a CPU whose OpenBLAS would pick its own kernel (SkylakeX on an AVX-512 machine, whose sums
    round otherwise)."""
    import shlex

    import yaml

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "OMP_", "MKL_"))}
    env.pop("HYDRA_FULL_ERROR", None)
    args = ["train.epochs=300", "tracking.enabled=false"]

    def run(*cmd: str) -> None:
        proc = subprocess.run(list(cmd), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python`, as make run has it
    for name in ("load", "normalize", "train"):  # in a shell, as DVC runs a stage's command
        run("sh", "-c", " ".join([stages[name]["cmd"], *map(shlex.quote, [*args, f"paths.out_dir={tmp_path / 'stages'}"])]))
    run(sys.executable, "-m", "pipeline", *args, f"paths.out_dir={tmp_path / 'one'}")
    for launcher in ("basic", "joblib"):
        run(sys.executable, "-m", "pipeline", "-m", *args, "seed=0,1", f"hydra/launcher={launcher}",
            f"hydra.sweep.dir={tmp_path / launcher}", "hydra.sweep.subdir=${seed}")

    def weights(folder):
        with np.load(folder / "models/weights.npz", allow_pickle=False) as f:
            return {k: f[k].tobytes() for k in f}

    made = {name: weights(tmp_path / name) for name in ("stages", "one")}
    made.update({launcher: weights(tmp_path / launcher / "0") for launcher in ("basic", "joblib")})
    assert all(w == made["stages"] for w in made.values()), [n for n, w in made.items() if w != made["stages"]]
    assert weights(tmp_path / "joblib" / "1") != made["stages"]  # another seed: the comparison can see a difference


def test_the_blas_is_chosen_before_numpy_loads_it():
    """A process that imports pipeline first runs OpenBLAS on one thread, and on an x86-64 CPU
    with AVX2 on the Haswell kernels, whatever it would pick itself; a value the environment
    sets is kept (pipeline.reproduce sets a run's own)."""
    from pipeline import blas

    code = "import pipeline, numpy; from pipeline import blas; print(blas.describe()); print(blas.check())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    described, problem = shown.stdout.strip().splitlines()
    assert described.endswith(" 1 threads") and problem == "None", shown.stdout
    if blas.has_avx2():
        assert " Haswell 1 threads" in described, described
        empty = subprocess.run([sys.executable, "-c", code], env={**env, "OPENBLAS_CORETYPE": "",
                                                                  "OPENBLAS_NUM_THREADS": ""},
                               capture_output=True, text=True, check=True)
        assert " Haswell 1 threads" in empty.stdout  # set but empty: catnet still chooses
    chosen = subprocess.run([sys.executable, "-c", code], env={**env, "OPENBLAS_NUM_THREADS": "2"},
                            capture_output=True, text=True, check=True)
    assert chosen.stdout.splitlines()[0].endswith(" 2 threads")
    # NumPy loaded first (a notebook, a test): the threads are still held to one, and a kernel
    # other than the chosen one is said, not hidden
    late = "import numpy, pipeline; from pipeline import blas; print(blas.in_use()[0]['architecture']); " \
           "print(blas.settle()); print(blas.describe())"
    native, problem, described = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True,
                                                check=True).stdout.strip().splitlines()
    assert described.endswith(" 1 threads"), described
    if blas.has_avx2() and native != "Haswell":
        assert f"runs its {native} kernels, not OPENBLAS_CORETYPE=Haswell" in problem, problem
