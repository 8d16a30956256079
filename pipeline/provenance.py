"""What a run is called and where it comes from: its name (the overrides that make it differ from
the defaults, short), the sweep parent it belongs to, and its provenance (the code's commit and
whether the tree was dirty, the package versions, the DVC experiment)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess

from omegaconf import DictConfig

from pipeline.common import ROOT, is_multirun

PARENT_ENV = "CATNET_MLFLOW_PARENT_RUN_ID"
SWEPT_ENV = "CATNET_SWEPT_KEYS"  # the keys the sweep varies: children are named by their values
SHORT_KEYS = {"hidden_sizes": "hidden"}  # names in run names, where the last part of a key is long


def parent_run_id() -> str | None:
    """The id of the sweep's parent run, for a job's run (``PARENT_ENV``, set by the sweep)."""
    return os.environ.get(PARENT_ENV) or None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


_PROVENANCE: dict[str, str] = {}  # a sweep's jobs in one process run the code it imported once


def provenance_tags() -> dict[str, str]:
    """What it takes to reproduce a run: the code's commit, the package versions and the BLAS (asked of
    git once per process in a sweep, whose jobs all run the code the process imported)."""
    if not (_PROVENANCE and is_multirun()):
        _PROVENANCE.clear()
        _PROVENANCE.update(_provenance())
    return dict(_PROVENANCE)


LOCK_TAG = "catnet.lock"  # sha256 of the requirements.lock the run's code pins, 16 hex digits


def lock_digest(lock_text: str) -> str:
    import hashlib

    return hashlib.sha256(lock_text.encode()).hexdigest()[:16]


BLAS_TAG = "catnet.blas"  # which BLAS computed the run, its kernel and thread count: float sums depend on them


def blas() -> str:
    """The BLAS that computes this run's numbers, its kernel and threads (pipeline/blas.py)."""
    from pipeline import blas as catnet_blas

    return catnet_blas.describe()


def _provenance() -> dict[str, str]:
    import importlib.metadata as md

    versions = ", ".join(f"{p} {md.version(p)}" for p in ("numpy", "h5py", "hydra-core", "mlflow"))
    tags = {"catnet.versions": f"python {platform.python_version()}, {versions}", BLAS_TAG: blas()}
    lock = ROOT / "requirements.lock"
    if lock.exists():  # what rebuilds the environment: pipeline.reproduce (pipeline/envs.py)
        tags[LOCK_TAG] = lock_digest(lock.read_text())
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["catnet.git.dirty"] = str(bool(changed_files()))
    if os.environ.get("DVC_EXP_NAME"):
        tags["catnet.dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


CODE_DIRS = ("src/", "pipeline/", "conf/", "hydra_plugins/")  # where a new file is code or config that runs


def changed_files() -> list[str]:
    """The files that make the run's code differ from its commit: any file git tracks that
    changed, and a new file in the code's or the config's folders; never what the pipeline and
    DVC write (``dvc_results``): `dvc repro` and `dvc exp run` rewrite those."""
    results = [f":(exclude){p}" for p in dvc_results()]
    status = _git("status", "--porcelain", "--untracked-files=all", "--", ".", *results) or ""
    changed = []
    for line in status.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if not line.startswith("??") or path.startswith(CODE_DIRS):
            changed.append(path)
    return changed


def dvc_results() -> list[str]:
    """What the pipeline and DVC write, not the code: the stages' files (dvc.yaml's outs, metrics
    and plots), dvc.lock, and params.yaml (the composed config, which ``make run`` and every ``dvc
    exp run`` rewrite; a run records the config it ran as its params)."""
    import yaml

    try:
        stages = (yaml.safe_load((ROOT / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return []
    paths = ["dvc.lock", "params.yaml"]
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind) or []:
                paths.append(next(iter(item)) if isinstance(item, dict) else str(item))
    return paths


def short_value(value: str) -> str:
    """A number of many digits to three significant ones (``2.0876396919207562e-05`` ->
    ``2.09e-05``); anything else as it is."""
    if len(value) <= 7 or not any(c in value for c in ".eE"):
        return value
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


def short_keys(keys: list[str]) -> list[str]:
    """Each key by its last part (``train.lr`` -> ``lr``, ``model.hidden_sizes`` -> ``hidden``),
    unless two would look alike."""
    short = [SHORT_KEYS.get(k.rsplit(".", 1)[-1], k.rsplit(".", 1)[-1]) for k in keys]
    return [s if short.count(s) == 1 else k for s, k in zip(short, keys)]


def short_name(overrides: list[str]) -> str:
    """``train.lr=0.005 model.hidden_sizes=[64,16] seed=3`` -> ``lr=0.005 hidden=[64,16] seed=3``:
    each key by its last part (``short_keys``), each number short (``short_value``)."""
    pairs = [o.lstrip("+~").split("=", 1) for o in overrides]
    pairs = [(k, v[0] if v else "") for k, *v in pairs]
    names = short_keys([k for k, _ in pairs])
    return " ".join(f"{n}={short_value(v)}" for n, (_, v) in zip(names, pairs))


def run_name(cfg: DictConfig) -> str:
    """``tracking.run_name``, else what differs from the defaults: the command-line overrides
    (in a sweep, the job number and the swept values: ``#3 lr=0.005 hidden=[64,16]``), after the
    DVC experiment's name under ``dvc exp run``; ``default`` when nothing differs."""
    if cfg.tracking.run_name:
        return str(cfg.tracking.run_name)[:250]
    from hydra.core.hydra_config import HydraConfig

    overrides: list[str] = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task
                     if not o.lstrip("+~").startswith(("tracking.", "paths.", "hydra"))]
        swept = [k for k in os.environ.get(SWEPT_ENV, "").split(",") if k]
        if swept:  # a sweep's child: named by the values it sweeps
            overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or overrides
        if parent_run_id():  # after its job number, which the UI's narrow name column keeps
            job = f"#{HydraConfig.get().job.num}"
            return f"{job} {short_name(overrides)}".strip()[:250]
    if os.environ.get("DVC_EXP_NAME") and not overrides:
        overrides = dvc_exp_changes()
    name = " ".join(p for p in (os.environ.get("DVC_EXP_NAME", ""), short_name(overrides)) if p)
    return (name or "default")[:250]


def dvc_exp_changes() -> list[str]:
    """Under ``dvc exp run``, its ``-S`` changes as overrides (``train.lr=0.01``), written as on a
    command line: params.yaml, which DVC composed from conf/ and them, against conf/ alone."""
    import yaml

    from pipeline.params import composed_yaml

    def leaves(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix[:-1], yaml.safe_dump(node, default_flow_style=True, width=10**6).strip().removesuffix("\n...")

    try:
        ran = dict(leaves(yaml.safe_load((ROOT / "params.yaml").read_text())))
        default = dict(leaves(yaml.safe_load(composed_yaml())))
    except Exception:  # noqa: BLE001 - a name is not worth failing a run: DVC's name alone then
        return []
    return [f"{k}={v.replace(', ', ',')}" for k, v in ran.items()
            if default.get(k) != v and not k.startswith(("tracking.", "paths.", "hydra"))]


SLURM_TAG = "catnet.slurm.job_id"  # the SLURM job a run ran in


def process_tags() -> dict[str, str]:
    """Where this run runs: host, process id and that process's start time (a pid is reused), and
    in a SLURM job its id (``<array job>_<task>`` for a sweep's job, as squeue and sacct name it)."""
    import psutil

    tags = {"catnet.host": socket.gethostname(), "catnet.pid": str(os.getpid()),
            "catnet.pid_started": f"{psutil.Process().create_time():.3f}"}
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        tags[SLURM_TAG] = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    elif os.environ.get("SLURM_JOB_ID"):
        tags[SLURM_TAG] = os.environ["SLURM_JOB_ID"]
    return tags
