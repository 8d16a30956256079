"""The one package that talks to MLflow; nothing else in catnet imports it.

Its modules, in layers: each imports only modules of the layers above it (docs/architecture.md).

- ``store``: where the record is (URIs, client, experiments) and closing runs of dead processes;
- ``outage``: a server that stops answering (every request waits for it, ``tracking.retry_seconds``);
- ``model``: the network as an MLflow model (log, register, load; its code: ``pyfunc``);
  ``query``: searching runs, and the one ranking rule of sweeps, ``register`` and ``compare`` (never test/);
- ``run``: a run's life (params, batched per-epoch metrics, files from a private folder, status);
  ``reuse``: a run's identity, and the link that spares a job from training twice;
- ``parent``: a sweep's parent run (opened before the jobs, closed with counts and the best child).

``mlflow`` itself is imported only when tracking is on: it costs over a second. tests/test_layout.py
checks that no module outside this package imports it, and that the imports form no circle.
"""

import os

# MLflow's usage telemetry fetches its settings from the internet and sends events from a thread of
# every process that imports mlflow (about 1 s of a 4-job sweep here); catnet turns it off before
# mlflow is imported. A user's own MLFLOW_DISABLE_TELEMETRY=false turns it back on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# nor does a sweep's log get MLflow's progress bars when the parent fetches its best child's files to
# make its model (tqdm lines that logs keep as they are); MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=true: back
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# MLflow's first open of a new SQLite store runs its schema migrations, and alembic logs its set-up
# ("setup plugin alembic...") at INFO into a sweep's log
import logging  # noqa: E402

logging.getLogger("alembic").setLevel(logging.WARNING)
# nor its "Validating input example against model signature" for every model logged
logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)

from pipeline.provenance import PARENT_ENV, SWEPT_ENV, provenance_tags  # noqa: F401,E402
from pipeline.tracking.life import open_run  # noqa: F401,E402 - the stages' interface
from pipeline.tracking.run import MlflowRun, NullRun  # noqa: F401,E402
from pipeline.tracking.store import open_store, store_uri  # noqa: F401,E402
from pipeline.tracking import life, parent, reuse  # noqa: F401,E402 - after run and store, which they use
