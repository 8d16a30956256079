"""What ``python -m pipeline -m`` starts before it imports anything else: a sweep's record
helper process (pipeline/tracking/writer.py, helper.py). It imports MLflow while the sweep's process
imports Hydra, NumPy and the stages (about 0.5 s) and composes the config; the sweep takes it
(writer.start_early, writer.start) or, if it turns out not to use it, closes it. Standard
library only: this runs before those imports."""

from __future__ import annotations

import os
import socket as sockets
import subprocess
import sys
import tempfile

SERVE = ("import sys; from pipeline.tracking.helper import serve; "
         "sys.exit(serve(sys.argv[1], sys.argv[2], int(sys.argv[3])))")
# a sweep that will not use the helper: launchers other than Hydra's basic one and joblib's, tracking
# off, each job writing its own record, a server (pipeline/sweep.py: start_writer decides, once
# the config is composed)
SKIP = ("hydra/launcher=", "tracking.enabled=false", "tracking.sweep_writer=thread", "tracking.uri=http")
SERVED = ("hydra/launcher=basic", "hydra/launcher=joblib")  # launchers whose jobs hand the helper their records
STARTED: list[tuple] = []  # what ``spawn`` returns, until taken


def spawn(uri: str) -> tuple[subprocess.Popen, object, str, sockets.socket]:
    """The helper for the store at ``uri`` (empty: told later), in a session of its own: a
    terminal's Ctrl-C, sent to the sweep's process group, stops the job, not this helper, which
    writes what it was handed (the stopped run KILLED last). Returns the process; its stderr, a
    temporary file, for the reason it ended; the Unix socket it listens on, in a folder only this
    user can open, where a joblib worker's jobs reach it; and this process's end of the socket
    pair it was started with, through which the sweep reaches it (its end ends the helper)."""
    errors = tempfile.TemporaryFile()
    socket = os.path.join(tempfile.mkdtemp(prefix="catnet-record-"), "helper")
    ours, theirs = sockets.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", SERVE, uri, socket, str(theirs.fileno())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                            pass_fds=(theirs.fileno(),),
                            start_new_session=True)
    theirs.close()
    return proc, errors, socket, ours


def start(argv: list[str]) -> None:
    """Start the helper now if the command line (Hydra's) asks for a sweep that will likely use it
    (sequential or joblib's, tracked, not into a server, on more than one core). If this process ends before
    the sweep takes it, its end of the socket pair closes with it, and the helper ends."""
    sweep = any(a in ("-m", "--multirun") or a.lower() == "hydra.mode=multirun" for a in argv)
    if (sweep and not STARTED and (os.cpu_count() or 1) > 1
            and not any(a.lower().lstrip("+").startswith(SKIP) and a.lower().lstrip("+") not in SERVED for a in argv)):
        STARTED.append(spawn(""))
