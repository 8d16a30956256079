"""A run's life as the stages see it: ``open_run`` creates the run (or, under ``dvc repro``,
continues the one the train stage handed over to the evaluate stage: ``continued``), and sets its
status honestly: FINISHED only when the last stage succeeded, FAILED (or KILLED on Ctrl-C / SIGTERM)
with the reason as a tag when a stage raised; a run the server did not take says where its
weights are kept. ``supersede``: the train stage's earlier run, never to be continued.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from typing import Iterator

from omegaconf import DictConfig, OmegaConf

from catnet.errors import ConfigError, TrainingDiverged, TrialPruned
from pipeline.common import told
from pipeline import provenance
from pipeline.tracking import store
from pipeline.tracking.run import PRUNED_TAG, MlflowRun, NullRun, ServerLost, end_after, mark, status_after

log = logging.getLogger("catnet")


def continued(cfg: DictConfig, info: dict) -> MlflowRun:
    """The run the train stage handed over (``info``: its run id and tracking URI), if it is
    still RUNNING. If an earlier evaluate already closed it (``dvc repro`` re-ran evaluate
    alone), or the store no longer has it, a new run evaluates the same weights (tag
    ``catnet.weights_run_id``). A run whose training did not succeed is never continued."""
    from mlflow.exceptions import MlflowException

    resolved = OmegaConf.merge(cfg, {"tracking": {"uri": info.get("tracking_uri")}})
    client, _ = store.open_store(resolved)
    run_id = info["run_id"]
    try:
        run = client.get_run(run_id)
    except MlflowException:  # another store, or a store made anew: the weights are still valid
        log.warning("tracking: run %s (the train stage's) is not in %s: evaluating its weights in a new run",
                    run_id, client.tracking_uri)
        return MlflowRun.create(resolved, tags={"catnet.weights_run_id": run_id})
    if run.info.status == "RUNNING":
        self = MlflowRun(client, run_id, client.tracking_uri, float(cfg.tracking.flush_seconds))
        if store.HANDOFF_TAG in run.data.tags:
            client.delete_tag(run_id, store.HANDOFF_TAG)
        self.set_tags(provenance.process_tags())
        return self
    if run.data.tags.get("catnet.trained") != "true":
        raise ConfigError(f"MLflow run {run_id} is {run.info.status} and its training did not succeed; "
                          "re-run training: dvc repro --force train")
    self = MlflowRun.create(resolved, tags={"catnet.weights_run_id": run_id,
                                      "catnet.data.md5": run.data.tags.get("catnet.data.md5", "")})
    log.info("tracking: run %s is %s already: evaluating its weights in a new run", run_id, run.info.status)
    return self


def _lost(run: MlflowRun, error: BaseException) -> ServerLost:
    """``error`` (the server did not answer) as one line that says where the trained weights are
    kept, carrying what ``error`` carried of the run."""
    lost = ServerLost(f"MLflow run {run.run_id}: the tracking server did not answer ({store.brief(error)})"
                      f"{run.kept()}")
    lost.__cause__ = error
    mark(lost, ended=run.run_id)
    return lost


def supersede(cfg: DictConfig, previous: dict) -> None:
    """The train stage runs again: its previous run, if still waiting for evaluate (handoff),
    will never be continued (its weights are replaced). KILLED, with the reason."""
    try:
        client, _ = store.open_store(OmegaConf.merge(cfg, {"tracking": {"uri": previous.get("tracking_uri")}}))
        run = client.get_run(previous["run_id"])
    except Exception:  # noqa: BLE001 - another store, or gone: nothing to close
        return
    if run.info.status == "RUNNING" and store.HANDOFF_TAG in run.data.tags:
        client.set_tag(run.info.run_id, "catnet.failure",
                       "superseded: the train stage ran again before the evaluate stage continued this run")
        client.set_terminated(run.info.run_id, "KILLED")


@contextmanager
def open_run(cfg: DictConfig, *, resume: dict | None = None, finish: bool = True,
             tags: dict[str, str] | None = None) -> Iterator[NullRun]:
    """The run the stages inside the block log to.

    ``resume``: the run info the train stage wrote ({'run_id', 'tracking_uri'}), to continue
    that run instead of creating one. ``tags``: the new run's, written with it (one write less
    per run than setting them after). On success the run is FINISHED if ``finish``, else left
    RUNNING for the next stage (tag ``catnet.handoff``, so that no later command takes it for
    an orphan). On any exception it is FAILED (KILLED for Ctrl-C / SIGTERM) and the reason is
    tagged ``catnet.failure``; the exception propagates.
    """
    if not cfg.tracking.enabled or (resume is not None and not resume.get("run_id")):  # or training ran untracked
        untracked = NullRun()
        yield untracked
        untracked.complete()
        return
    run = continued(cfg, resume) if resume is not None else MlflowRun.create(cfg, tags)
    try:
        yield run
        run.complete()
        run.flush()
    except BaseException as e:
        status = status_after(e)
        mark(e, ended=run.run_id)
        lost = store.unreachable(e)
        if lost:  # the server stayed away longer than tracking.retry_seconds: one line, and what is kept
            e = _lost(run, e)
        try:
            if not lost:
                run.flush()
            if isinstance(e, TrainingDiverged):
                run.set_tags({"catnet.diverged_epoch": str(e.epoch)})
            elif isinstance(e, TrialPruned):
                run.set_tags({PRUNED_TAG: str(e.step)})
        except Exception as unsent:  # noqa: BLE001 - the store is down: the status is what matters now
            log.error("tracking: run %s: its last points could not be written (%s)", run.run_id, store.brief(unsent))
        end_after(run, e, status, f"{type(e).__name__}: {told(e)}")
        if lost:
            raise e from e.__cause__
        raise
    if finish:
        run.end("FINISHED")
    else:
        run.set_tags({store.HANDOFF_TAG: "evaluate"})
        shutil.rmtree(run.private, ignore_errors=True)
