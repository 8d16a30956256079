"""What ``python -m pipeline -m`` starts before it imports anything else: a sweep's record
helper process (pipeline/tracking/writer.py). It imports MLflow while the sweep's process
imports Hydra, NumPy and the stages (about 0.5 s) and composes the config; the sweep takes it
(writer.start_early, writer.start) or, if it turns out not to use it, closes it. Standard
library only: this runs before those imports."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

SERVE = "import sys; from pipeline.tracking.helper import serve; sys.exit(serve(sys.argv[1], sys.argv[2]))"
# a sweep that will not use the helper: launchers other than Hydra's basic one and joblib's, tracking
# off, each job writing its own record, a server (pipeline/sweep.py: start_writer decides, once
# the config is composed)
SKIP = ("hydra/launcher=", "tracking.enabled=false", "tracking.sweep_writer=thread", "tracking.uri=http")
SERVED = ("hydra/launcher=basic", "hydra/launcher=joblib")  # launchers whose jobs hand the helper their records
STARTED: list[tuple[subprocess.Popen, object, str]] = []  # (the process, its stderr file, its socket), until taken


def spawn(uri: str) -> tuple[subprocess.Popen, object, str]:
    """The helper for the store at ``uri`` (empty: told later), in a session of its own: a
    terminal's Ctrl-C, sent to the sweep's process group, stops the job, not this helper, which
    writes what it was handed (the stopped run KILLED last). Its stderr goes to a temporary file,
    for the reason it ended. It listens on a Unix socket in a folder only this user can open
    (the third item), where a joblib worker's jobs hand it their records."""
    errors = tempfile.TemporaryFile()
    socket = os.path.join(tempfile.mkdtemp(prefix="catnet-record-"), "helper")
    proc = subprocess.Popen([sys.executable, "-c", SERVE, uri, socket], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=errors, start_new_session=True)
    return proc, errors, socket


def start(argv: list[str]) -> None:
    """Start the helper now if the command line (Hydra's) asks for a sweep that will likely use it
    (sequential or joblib's, tracked, not into a server, on more than one core). If this process ends before
    the sweep takes it, the helper's input ends with it, and so does the helper."""
    sweep = any(a in ("-m", "--multirun") or a.lower() == "hydra.mode=multirun" for a in argv)
    if (sweep and not STARTED and (os.cpu_count() or 1) > 1
            and not any(a.lower().lstrip("+").startswith(SKIP) and a.lower().lstrip("+") not in SERVED for a in argv)):
        STARTED.append(spawn(""))
