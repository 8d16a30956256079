"""A tracking server that stops answering: how it is seen, told in one line, and waited out.

Every request a command makes of a server goes through ``patiently`` (the client ``store.client``
returns is a ``Patient``): it is asked again as soon as the server answers, until
``tracking.retry_seconds`` have passed since it stopped; MLflow's own retries are off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from catnet.errors import CatnetError

log = logging.getLogger("catnet")


def server_answer(uri: str, timeout: float = 10.0) -> str | None:
    """None when the MLflow server at ``uri`` answers its health check, else why not."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            return None if r.status == 200 else f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))


def check_server(uri: str, wait: float = 0.0) -> None:
    """Fail when no MLflow server answers at ``uri`` (MLflow's own client retries for minutes):
    at once by default (a wrong URI is told in a second, before any training), or after
    ``wait`` seconds of asking again every second (a sweep's job, whose server answered when the
    sweep started, waits out a short outage)."""
    deadline = time.monotonic() + wait
    while (reason := server_answer(uri)) is not None and time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    if reason is not None:
        waited = f" for {wait:g} s" if wait else ""
        raise ServerUnreachable(f"tracking.uri={uri}: no MLflow server answers there{waited} ({reason})")


class ServerUnreachable(CatnetError):
    """The tracking server does not answer."""


def unreachable(error: BaseException) -> bool:
    """Whether ``error`` is the tracking server not answering (after MLflow's retries)."""
    import requests
    import urllib3

    lost = (ServerUnreachable, requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)  # killed mid-answer
    seen = error
    while seen is not None:
        if isinstance(seen, lost):
            return True
        seen = seen.__cause__ or seen.__context__
    return any(m in str(error) for m in ("Max retries exceeded", "Connection broken", "Connection aborted"))


def brief(error: BaseException) -> str:
    """An MLflow client error's first line (after its retries, a long message), at most 300 characters;
    SQLAlchemy's note that a flush raised it is not that line (the database's words follow it)."""
    lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith("(raised as a result of")]
    return (lines or [type(error).__name__])[0][:300]


class RecordLost(CatnetError):
    """A run's final status could not be written: it stays RUNNING in the store until a later
    catnet command (or the sweep's end) closes it."""

    def __init__(self, run_id: str, status: str, error: BaseException):
        super().__init__(f"MLflow run {run_id} could not be marked {status} ({brief(error)}); it stays RUNNING")
        self.run_id = run_id  # run.recorded() and run.unfinished() read it: the run exists, RUNNING


def bound_retries() -> None:
    """MLflow's own HTTP retries off (7, with backoff: about 4 minutes, then up to 2 minutes late once
    the server is back): ``patiently`` asks again as soon as the server answers. Read per request."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"


_LOST_SINCE: list[float] = []  # when the server stopped answering, while it does not (for the log)


def patiently(uri: str, seconds: float | None, call, *args, **kwargs):
    """``call(*args, **kwargs)``, asked again while the server at ``uri`` does not answer, until
    ``seconds`` (``tracking.retry_seconds``) have passed since it stopped answering; then what the
    last attempt raised. Each attempt waits for the server's health check to answer (asked every
    second) first. Any other error is raised at once. A request cut off mid-answer may have been
    done: the calls a run makes are safe to ask twice (params and tags of the same value, metrics
    MLflow skips when already there, artifacts written whole) except run creation, whose orphan
    would stay RUNNING until its process ends and a later command closes it."""
    since = None
    while True:
        try:
            result = call(*args, **kwargs)
        except Exception as e:
            if seconds is None or not unreachable(e):
                raise
            now = time.monotonic()
            since = since if since is not None else now
            left = since + float(seconds) - now
            if left <= 0:
                raise
            if not _LOST_SINCE:
                _LOST_SINCE.append(now)
                log.warning("tracking: the server at %s does not answer (%s); waiting up to %g s for it",
                            uri, brief(e), float(seconds))
            deadline = now + left
            while server_answer(uri, timeout=max(0.5, min(5.0, deadline - time.monotonic()))) is not None:
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            continue
        if since is not None:
            with contextlib.suppress(IndexError):  # another thread may have said it first
                log.info("tracking: the server at %s answers again after %.0f s", uri,
                         time.monotonic() - _LOST_SINCE.pop())
        return result


class Patient:
    """An MlflowClient of a server whose every call waits out an outage of that server
    (``patiently``); attributes that are not public methods are the client's own."""

    def __init__(self, client, uri: str, seconds: float | None) -> None:
        self.client, self.uri, self.seconds = client, uri, seconds

    def __getattr__(self, name: str):
        attr = getattr(self.client, name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args, **kwargs):
            return patiently(self.uri, self.seconds, attr, *args, **kwargs)

        call.__name__ = name
        return call
