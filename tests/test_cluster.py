"""Sweeps on a real Ray cluster (`ray start --head`, started and stopped here by process id)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import import_or_skip, needs_data, run_cli, runs_of

pytestmark = needs_data


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on this machine, as a team starts one (`ray start --head`), in the foreground
    (--block) so that its process id stops it and everything it started."""
    import_or_skip("ray", reason="the cluster extra is not installed (make setup-cluster)")
    ray = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray), "start", "--head", "--block", "--port=0", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=open(tmp_path / "ray.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto'); ray.shutdown()"],
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert proc.poll() is None, (tmp_path / "ray.log").read_text()[-2000:]
            time.sleep(1)
        else:
            raise AssertionError("the Ray head did not answer in 120 s")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@pytest.mark.slow
def test_a_sweep_on_an_existing_ray_cluster_keeps_its_structure_and_outputs(ray_head, tmp_path):
    """hydra/launcher=ray_cluster: the jobs run on the cluster's workers (which do not inherit the
    driver's environment), stay children of the sweep's parent, are counted, and write their
    outputs under the sweep folder the command named (relative to where it ran)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "-m", "seed=0,1", "hydra/launcher=ray_cluster",
                           "train.epochs=20", "train.check_learned=false", f"tracking.uri={uri}",
                           "tracking.experiment=test", "hydra.sweep.dir=sweeps/cluster"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "sweep: 2 jobs, 2 finished, 0 failed" in log
    client, runs = runs_of(uri)
    parent = next(r for r in runs if r.data.tags.get("catnet.sweep") == "parent")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.params["sweep.launcher"] == "RayClusterLauncher"
    assert sorted(c.info.run_name for c in children) == ["#0 seed=0", "#1 seed=1"]
    assert all(c.info.status == "FINISHED" for c in children) and len(runs) == 3
    assert all(len(client.get_metric_history(c.info.run_id, "train/error")) == 20 for c in children)
    for job in ("0", "1"):
        assert (tmp_path / "sweeps/cluster" / job / "models/weights.npz").is_file()
    # ray_local keeps starting a private instance while a cluster runs on the machine
    local = run_cli("-m", "seed=0,1", "hydra/launcher=ray_local", "train.epochs=5", "train.check_learned=false",
                    f"tracking.uri={uri}", "tracking.experiment=local", f"hydra.sweep.dir={tmp_path / 'local'}")
    assert "sweep: 2 jobs, 2 finished, 0 failed" in local.stdout + local.stderr
