"""Hydra multirun into MLflow: one parent run per sweep, one child run per job, honest counts.

``MlflowSweep`` is a Hydra callback (conf/config.yaml, ``hydra.callbacks``); it runs in the
process that launches the sweep. Before any job starts it creates the SQLite store, the
experiment and the parent run, so parallel jobs never race to create them, and hands the
parent's id to the jobs through the environment (``provenance.PARENT_ENV``, inherited by joblib's and
local Ray's workers, carried by the Ray cluster and SLURM launchers). Each job's outcome is its
run in the store (status and tags), which the sweep reads at its end; catnet's sweepers also hand
it each job's return (``returned``), so that it knows the jobs of an untracked sweep, or of one whose
store does not answer at its end, and a job that failed without a run.

When the sweep ends the parent records the number of jobs, finished, failed and diverged, and the
best child by the one ranking rule (pipeline/tracking/query.py: validation, then cross-validation,
then training metrics, never test). A sweep in which any job failed (a diverged one is a result,
not a failure: parent.failures) is FAILED and exits 1;
Ctrl-C or SIGTERM marks the parent and every child still running KILLED (exit 130 / 143).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from catnet.errors import CatnetError, ConfigError, check_choice
from pipeline import common, search
from pipeline.tracking import parent
from pipeline.tracking.store import UNREACHABLE

log = logging.getLogger("catnet")
JOBS: list = []  # the returns (Hydra JobReturns) of the jobs of the sweep this process runs


def returned(job) -> None:
    """A job of this process's sweep ended: its JobReturn (catnet's sweepers call this)."""
    JOBS.append(job)


def _optuna_logs_as_hydra_s(config: DictConfig) -> None:
    """Optuna's lines go through the sweep's logging, as Hydra's do: Optuna's own handler colours
    them with escape codes even in a file or a pipe."""
    if "optuna" in str(config.hydra.sweeper.get("_target_", "")).lower():  # the sweeper imports it next
        import optuna

        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()


class MlflowSweep(Callback):
    def __init__(self) -> None:
        self.record: parent.Parent | None = None  # the parent run, if tracked
        self.parent_id: str | None = None  # until the parent run is closed

    def __getstate__(self) -> dict:
        """Hydra pickles its callbacks into joblib's workers, which call none of these hooks: the
        parent's client stays here."""
        return {**self.__dict__, "record": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:  # what every job would refuse is refused once, before any job starts
            _order(config)
            check_choice("sweep.direction", config.sweep.direction, ("maximize", "minimize"))
            refuse_unreachable_store(config)
            refuse_missing_engine(config)
            if config.hydra.sweeper.get("study_name"):  # an Optuna search's pruner and sampler
                search.check(config.hydra.sweeper)
            if config.tracking.enabled:  # a store that cannot be opened (a server that does not answer,
                self._open_parent(config)  # a deleted experiment): no job would get further
        except CatnetError as e:  # Hydra turns a callback's exception into a warning: exit here
            print(f"catnet: error: {common.told(e)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        _optuna_logs_as_hydra_s(config)
        JOBS.clear()
        signal.signal(signal.SIGTERM, common.raise_terminated)  # stop the way Ctrl-C stops
        common.ABORT_HOOKS.append(self.abort)
        atexit.register(self._abandoned)  # the sweep stopped another way: on_multirun_end never came
        if config.tracking.enabled:  # for the jobs: set now, inherited by workers started now
            from pipeline import tracking

            if config.sweep.reuse and (why := tracking.reuse.why_none()):
                log.warning("sweep: no job is reused from an earlier run: %s (commit it, or sweep.reuse=false)", why)
            os.environ[tracking.SWEPT_ENV] = ",".join(swept_keys(config))
        warm_joblib_workers(config)  # they start while the jobs' configs are composed

    def _open_parent(self, config: DictConfig) -> None:
        """The parent run, created before any job starts (or any joblib worker: they inherit its id)."""
        from pipeline import tracking

        hc = config.hydra
        name, description = sweep_name(config)
        top = parent.describe(name, description, {
            "sweep.overrides": " ".join(hc.overrides.task),
            "sweep.sweeper": hc.sweeper._target_.rsplit(".", 1)[-1],
            "sweep.launcher": hc.launcher._target_.rsplit(".", 1)[-1],
            "sweep.ranking": f"{' > '.join(_order(config))} ({config.sweep.direction})",
            "sweep.dir": str(hc.sweep.dir),
            **({"sweep.study": str(hc.sweeper.study_name), "sweep.storage": search.shown(hc.sweeper.storage),
                "sweep.pruner": str(hc.sweeper.pruner)} if hc.sweeper.get("study_name") else {}),
        })
        # the sweep's end waits tracking.retry_seconds for a server, even one a job gave up on
        self.record = parent.Parent(config, top, before=lambda: tracking.store.wait_for_server(config, None))
        self.parent_id = self.record.open()
        os.environ[tracking.PARENT_ENV] = self.parent_id
        log.info("sweep: MLflow parent run %s", self.parent_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        jobs, JOBS[:] = list(JOBS), []
        if self.parent_id is not None:
            result = self.record.finish(jobs, _order(config), config.sweep.direction)
            self.parent_id = None
            _clear_env()
        else:  # untracked: what the jobs returned
            result = parent.summary_of([parent.returned(job) for job in jobs])
        (Path(str(config.hydra.sweep.dir)) / UNREACHABLE).unlink(missing_ok=True)
        counts, status, reason, summary, lost = (result[k] for k in ("counts", "status", "reason", "summary", "lost"))
        best = (f"; best {summary['best_run_name']!r} ({summary['best_run_id']}) by {summary['objective']}"
                if summary.get("best_run_id") else "")
        log.info("sweep: %d jobs, %d finished, %d failed, %d diverged, %d pruned; %d trained, %d reused%s",
                 counts["jobs"], counts["finished"], parent.failures(counts), counts["diverged"], counts["pruned"],
                 counts["finished"] - counts["reused"], counts["reused"], best)
        if lost:
            reason = (f"{reason}; not in the tracking store: {'; '.join(lost)} (once it answers, a later catnet "
                      "command on the host of a run's ended process marks that run KILLED)")
        if status != "FINISHED":
            print(f"catnet: error: sweep: {reason}", flush=True, file=sys.stderr)
            raise SystemExit(1)

    def abort(self, status: str, reason: str) -> None:
        """Ctrl-C / SIGTERM in the launching process: the parent and every child still running
        are KILLED (a child's own process marks its run too, if it gets the chance); a finished
        job's run stays FINISHED."""
        JOBS.clear()
        if self.parent_id is not None:
            self.parent_id = None
            try:
                self.record.abort(status, reason)
            finally:
                _clear_env()

    def _abandoned(self) -> None:
        if self.parent_id is not None:
            self.abort("FAILED", "it ended before its summary")


def _launcher(config: DictConfig) -> str:
    return str(config.hydra.launcher.get("_target_", ""))


def warm_joblib_workers(config: DictConfig) -> None:
    """With ``hydra/launcher=joblib``, start its worker processes now, in the background, each
    importing what a job needs (the pipeline; MLflow and its store): the launcher's own ``joblib.Parallel``, with the same
    arguments, reuses them (loky's reusable executor) instead of starting them after the parent
    run is created and every job's config composed. Anything that goes wrong here only leaves
    the launcher to start its workers itself."""
    launcher = config.hydra.launcher
    if not _launcher(config).endswith("JoblibLauncher"):
        return
    import threading

    # the joblib launcher's own translation of its config into joblib's arguments: a private name
    # of hydra-joblib-launcher, used only here (tests/test_layout.py fails if it moves)
    from hydra_plugins.hydra_joblib_launcher._core import process_joblib_cfg
    from joblib import Parallel, delayed
    from omegaconf import OmegaConf

    kwargs = {k: v for k, v in OmegaConf.to_container(launcher, resolve=True).items() if k != "_target_"}
    kwargs["backend"] = "loky"  # as the launcher does
    process_joblib_cfg(kwargs)
    n_jobs = kwargs.get("n_jobs") or 1
    workers = max(1, (os.cpu_count() or 1) + 1 + n_jobs) if n_jobs < 0 else n_jobs  # joblib's meaning of -1, -2...

    def start() -> None:
        try:
            from pipeline.tracking.store import store_uri

            uri = store_uri(config)[0] if config.tracking.enabled else None
            Parallel(**kwargs)(delayed(_warm)(uri) for _ in range(workers))
        except Exception as e:  # noqa: BLE001 - the launcher starts its workers itself
            log.debug("sweep: joblib workers not warmed up: %s", e)

    threading.Thread(target=start, name="catnet-warm-workers", daemon=True).start()


def _warm(uri: str | None) -> int:
    """In a joblib worker: import what its first job would. The store itself is left alone: the
    sweep creates it (and a new SQLite file's tables) before any job, and only then."""
    import gc

    import hydra  # noqa: F401 - what the task function (pipeline/__main__.py) imports, but this module
    from pipeline import curve, evaluate, load, normalize, train  # noqa: F401 - which imports this one

    if uri is not None:
        from pipeline.tracking import store

        store.import_mlflow()
    gc.freeze()  # what was imported stays: the jobs' garbage collections (and the worker's exit) skip it
    return os.getpid()


def _clear_env() -> None:
    from pipeline import tracking

    os.environ.pop(tracking.PARENT_ENV, None)
    os.environ.pop(tracking.SWEPT_ENV, None)


def _order(config: DictConfig) -> list[str]:
    from pipeline.tracking.query import metric_order

    return metric_order(config.sweep.objective, config.sweep.fallback, knobs=("sweep.objective", "sweep.fallback"))


def remote_ray_address(config: DictConfig) -> str | None:
    """The Ray cluster address the sweep's launcher connects to, if that cluster lies on another
    host (neither ``auto``, ``local`` nor a loopback address)."""
    launcher = config.hydra.launcher
    if "ray" not in str(launcher.get("_target_", "")).lower():
        return None
    address = str(((launcher.get("ray") or {}).get("init") or {}).get("address") or "")
    if address in ("", "auto", "local", "None"):
        return None
    from urllib.parse import urlparse

    host = urlparse(address if "://" in address else f"ray://{address}").hostname or ""
    return None if is_loopback(host) else address


def refuse_unreachable_store(config: DictConfig) -> None:
    """Jobs on another host cannot write to this machine's SQLite file or loopback server."""
    address = remote_ray_address(config)
    if address and config.tracking.enabled and only_this_host(config):
        raise ConfigError(f"tracking.uri={config.tracking.uri}: the jobs run on the Ray cluster at {address}, "
                          "whose nodes cannot reach this machine's local store; set tracking.uri to an MLflow "
                          "server every node reaches, e.g. http://<server>:5000 (README: Team mode)")


def refuse_missing_engine(config: DictConfig) -> None:
    """A launcher whose engine is not there fails the sweep before any run: SLURM's ``sbatch`` not on
    this machine, a Ray cluster address (``<host>:<port>``, ``ray://<host>:<port>``, or for ``auto``
    what Ray would use: ``RAY_ADDRESS``, else the cluster ``ray start`` recorded) where nothing answers."""
    import shutil
    import socket
    import tempfile
    from urllib.parse import urlparse

    target = str(config.hydra.launcher.get("_target_", ""))
    if "slurm" in target.lower() and shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=slurm: SLURM's sbatch is not on this machine's PATH; run the sweep where "
                          "SLURM is (a login node), or choose another launcher (hydra/launcher=joblib)")
    if "ray_cluster" not in target:
        return
    address = str(((config.hydra.launcher.get("ray") or {}).get("init") or {}).get("address") or "")
    if address == "auto":  # as Ray resolves it: RAY_ADDRESS, else the cluster `ray start` last recorded here
        recorded = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        address = os.environ.get("RAY_ADDRESS") or (recorded.read_text().strip() if recorded.is_file() else "")
        if not address:
            raise ConfigError("hydra.launcher.ray.init.address=auto: no Ray cluster runs on this machine; start "
                              "one (ray start --head) or give its address")
    if address in ("local", "None"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    try:
        with socket.create_connection((parsed.hostname or "", parsed.port or 10001), timeout=5):
            pass
    except OSError as e:
        raise ConfigError(f"hydra.launcher.ray.init.address={address}: no Ray cluster answers there "
                          f"({e.strerror or e}); start one (ray start --head) or give its address") from None


def sweep_name(config: DictConfig) -> tuple[str, str]:
    """A sweep parent's name, which tells it apart from the experiment's other sweeps in the UI's
    runs table (its first 24 characters or so): the search, what it varies, what it sets apart
    from the defaults, and its job count (``grid lr×hidden seed=7 (4)``, ``optuna (12)``, ``optuna
    my-study (40)``); and its
    description (the run's note): the whole command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pipeline.provenance import short_keys, short_name

    overrides = [o for o in config.hydra.overrides.task
                 if not o.lstrip("+~").startswith(("tracking.", "hydra", "paths.", "hparams_search="))]
    parsed = OverridesParser.create().parse_overrides(overrides)
    swept = [o for o in parsed if o.is_sweep_override()]
    fixed = [text for text, o in zip(overrides, parsed) if not o.is_sweep_override()]
    n_trials = config.hydra.sweeper.get("n_trials")
    if n_trials is not None:  # an Optuna search: its study, unless the preset's
        study = str(config.hydra.sweeper.get("study_name") or "catnet")
        kind, jobs = "optuna" if study == "catnet" else f"optuna {study}", int(n_trials)
    else:
        kind, jobs = "grid", 1
        for o in swept:
            try:
                jobs *= len(list(o.sweep_string_iterator()))
            except Exception:  # noqa: BLE001 - a sweep Hydra's grid cannot count (interval): no count
                jobs = 0
    jobs_shown = f"({jobs})" if jobs else ""
    varied = "×".join(short_keys([o.get_key_element().lstrip("+~") for o in swept]))
    # a launcher chosen on the command line (the same grid on joblib is another sweep to compare)
    launcher = next((o.split("=", 1)[1] for o in config.hydra.overrides.hydra if o.startswith("hydra/launcher=")), "")
    name = " ".join(p for p in (kind, varied, short_name(fixed), launcher, jobs_shown) if p)
    command = [*config.hydra.overrides.task, *(o for o in config.hydra.overrides.hydra if o != "hydra.mode=MULTIRUN")]
    description = (f"{kind} sweep of {jobs or 'its'} job{'s' if jobs != 1 else ''}: python -m pipeline -m "
                   + " ".join(command))
    return name, description


def swept_keys(config: DictConfig) -> list[str]:
    """Keys given several values on the command line, or searched by the sweeper."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    keys = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    params = config.hydra.sweeper.get("params") or {}
    return keys + [k for k in params if k not in keys]


LOOPBACK = ("localhost", "127.0.0.1", "::1", "0.0.0.0")


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    return host in LOOPBACK or host.startswith("127.")


def only_this_host(cfg: DictConfig) -> bool:
    """Whether the configured store can be reached from this machine only: a SQLite file, or a
    server at a loopback address (which, on another machine, names that machine)."""
    from urllib.parse import urlparse

    uri = cfg.tracking.uri or ""
    if not uri or uri.startswith("sqlite:"):
        return True
    return uri.startswith(("http://", "https://")) and is_loopback(urlparse(uri).hostname or "")
