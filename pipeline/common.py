"""What every stage shares: where files are, how errors are reported, atomic writes."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from catnet.errors import CatnetError, DataError
from pipeline import config

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
# conf/config.yaml puts Hydra's run and sweep folders under ${catnet.root:}, whatever the working directory
OmegaConf.register_new_resolver("catnet.root", lambda: str(ROOT), replace=True)
# Hydra's job name of ``python -m pipeline`` (its file's stem): the app whose outputs go to its own folder
ALL_STAGES_JOB = "__main__"

log = logging.getLogger("catnet")


def resolve(path: str | Path) -> Path:
    """A path from the config: absolute as given, relative to the project root otherwise."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@dataclass(frozen=True)
class Outputs:
    """The files the stages write (the ``outs`` of dvc.yaml), under one root."""

    root: Path

    @classmethod
    def of(cls, cfg: DictConfig) -> "Outputs":
        """``paths.out_dir`` if set; else the project root for the DVC stages (``python -m
        pipeline.<stage>``, ``dvc repro``), and Hydra's own folder of the run or the sweep's job
        for ``python -m pipeline``, which leaves the DVC outputs alone (its record is MLflow's)."""
        if cfg.paths.out_dir:
            return cls(resolve(cfg.paths.out_dir))
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized() and (is_multirun() or HydraConfig.get().job.name == ALL_STAGES_JOB):
            return cls(Path(HydraConfig.get().runtime.output_dir))
        return cls(ROOT)

    flat_dir = property(lambda s: s.root / "data/flat")  # load: {train,test,val}_{x,y}.npy
    normalizer = property(lambda s: s.root / "models/normalizer.npz")  # normalize
    weights = property(lambda s: s.root / "models/weights.npz")  # train
    run_info = property(lambda s: s.root / "reports/mlflow_run.json")
    history = property(lambda s: s.root / "reports/train_history.csv")
    curve = property(lambda s: s.root / "reports/learning_curve.png")
    metrics = property(lambda s: s.root / "reports/metrics.json")  # evaluate


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(file)`` into a temporary file beside ``path``, then rename:
    a stage that fails or is killed never leaves a half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def load_npz(path: Path, stage: str) -> dict[str, np.ndarray]:
    """Arrays written by an earlier stage (never unpickled)."""
    if not path.exists():
        raise DataError(f"{path}: not found; run the '{stage}' stage first (dvc repro {stage})")
    with np.load(path, allow_pickle=False) as f:
        return dict(f)


def told(e: BaseException) -> str:
    """An error's one-line report: catnet's errors name config keys (config.KNOBS), not the
    library's parameter names."""
    return e.message(config.KNOBS) if isinstance(e, CatnetError) else str(e)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that a stage stops the way Ctrl-C stops it."""


def raise_terminated(signum, frame) -> None:
    raise Terminated(signal.Signals(signum).name)


# called, in order, with (status, reason) when Ctrl-C or SIGTERM stops a Hydra application
# outside a stage's own handling (a sweep between or around its jobs: pipeline/sweep.py)
ABORT_HOOKS: list[Callable[[str, str], None]] = []


def _interrupted(e: BaseException) -> None:
    """One line and exit 130 (Ctrl-C) or 143 (SIGTERM), after the abort hooks ran."""
    name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
    for hook in list(ABORT_HOOKS):
        try:
            hook("KILLED", name)
        except Exception as err:  # noqa: BLE001 - the exit status must still say what happened
            print(f"catnet: could not mark the runs KILLED: {err}", file=sys.stderr)
    print(f"catnet: interrupted by {name}; stopped cleanly", file=sys.stderr)
    sys.exit(143 if isinstance(e, Terminated) else 130)


def one_line(error: BaseException) -> str:
    """Hydra's report of a bad override (unknown key, missing config option, grammar) on one
    line: its lines and its cause's first line joined by '; ', option lists comma-separated,
    the config search path and OmegaConf's indented details left out."""
    lines = str(error).splitlines()
    if error.__cause__ is not None and str(error.__cause__):
        lines[1:1] = str(error.__cause__).splitlines()[:1]
    pieces: list[str] = []
    for line in lines:
        if line.startswith("Config search path"):
            break
        if line.startswith("\t") and pieces:  # an available option under "Available options in ..."
            pieces[-1] += (", " if not pieces[-1].endswith(":") else " ") + line.strip()
        elif line.strip() and not line.startswith(" "):
            pieces.append(line.strip().rstrip("."))
    return "; ".join(pieces)


HYDRA_PATCHED_FOR = ("1.3.",)  # the Hydra versions whose run_and_report the patch below was written for


def _report_bad_overrides_on_one_line() -> bool:
    """Make Hydra's entry points report a composition error (``train.lrr=1``, ``model=nope``,
    ``train.lr=[``) as every other bad input is reported: ``catnet: error: ...`` on one line,
    exit status 2, no traceback. HYDRA_FULL_ERROR=1 keeps Hydra's own report. Hydra has no
    public hook for this, so the patch is applied only to the Hydra versions it was written for
    and only when ``run_and_report`` still takes the one argument it wraps; otherwise Hydra's own
    multi-line report stays (tests/test_layout.py). Returns whether it patched."""
    import inspect

    try:
        import hydra
        from hydra._internal import utils as hydra_utils
        from hydra.errors import CompactHydraException
    except ImportError:
        return False
    report = getattr(hydra_utils, "run_and_report", None)
    if report is None or getattr(report, "catnet", False):
        return False
    try:
        takes_one = list(inspect.signature(report).parameters) == ["func"]
    except (TypeError, ValueError):
        takes_one = False
    if not takes_one or not str(getattr(hydra, "__version__", "")).startswith(HYDRA_PATCHED_FOR):
        return False

    def run_and_report(func):
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            try:
                return report(func)
            except (KeyboardInterrupt, Terminated) as e:
                _interrupted(e)

        def guarded():
            try:
                return func()
            except CompactHydraException as e:
                print(f"catnet: error: {one_line(e)}", file=sys.stderr)
                sys.exit(2)
            except CatnetError as e:  # a sweeper's refusal (a job's are its own: pipeline/__main__.py)
                print(f"catnet: error: {told(e)}", file=sys.stderr)
                sys.exit(2)

        try:
            return report(guarded)
        except (KeyboardInterrupt, Terminated) as e:  # a sweep stopped: its runs are KILLED
            _interrupted(e)

    run_and_report.catnet = True
    hydra_utils.run_and_report = run_and_report
    return True


_report_bad_overrides_on_one_line()


def run_main(main: Callable[[], Any]) -> None:
    """Run an entry point (``python -m pipeline...``) as its process's whole life. However it
    ends, the objects alive then are frozen out of the garbage collector (``gc.freeze``) before
    the interpreter exits: MLflow, SQLAlchemy and pandas leave about 270,000 of them, and the
    exit's collections over them took about 1 s of every tracked command. Everything is written
    and closed by then; the exit still runs the atexit handlers (logs, temporary folders)."""
    import gc

    try:
        main()
    finally:
        gc.freeze()


_BLAS_TOLD: list[str] = []  # what blas_settled said in this process (once is enough)


def blas_settled() -> None:
    """Hold the BLAS to catnet's choice (pipeline/blas.py) and say once per process, as a
    warning, what still differs from it: this process's numbers may then differ from another
    entry point's (its tag catnet.blas and its identity say which BLAS computed it)."""
    from pipeline import blas

    why = blas.settle()
    if why and why not in _BLAS_TOLD:
        _BLAS_TOLD.append(why)
        log.warning("%s: results may differ from other entry points' (dvc repro's, a sweep's)", why)


def run_cli(task: Callable[[DictConfig], Any], cfg: DictConfig, validate: bool = True) -> Any:
    """Run a stage from its Hydra entry point: check the config's values, then do the work.

    A CatnetError (bad file, bad value, divergence) becomes one line on stderr and exit
    status 2, without a traceback unless HYDRA_FULL_ERROR=1. Ctrl-C or SIGTERM: one line, exit
    130 or 143 (the MLflow run was marked KILLED on the way out; outputs are written whole or
    not at all).
    """
    signal.signal(signal.SIGTERM, raise_terminated)
    blas_settled()
    try:
        if validate:
            cfg = config.prepare(cfg, ROOT)
        return task(cfg)
    except CatnetError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"catnet: error: {told(e)}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Terminated) as e:
        _interrupted(e)
