# Two commands do all set-up on a fresh clone (with ../shared beside it):
#   make run    create .venv, install the pinned dependencies, pull the data, run the pipeline
#   make test   the same set-up, then the test suite
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
# dvc.yaml's stage commands call `python`: make it the project's
export PATH := $(BIN):$(PATH)

.PHONY: run test test-fast setup setup-cluster setup-bench bench data clean team-up team-down

run: data
	python -m pipeline.params
	dvc repro

# the suite on TEST_JOBS processes (pytest-xdist); the cluster tests share one of them
TEST_JOBS ?= 2
test: data
	python -m pytest -n $(TEST_JOBS) --dist loadgroup

test-fast: data
	python -m pytest -n $(TEST_JOBS) --dist loadgroup -m "not slow"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@# Hydra's own Optuna sweeper (optuna < 3), which an older checkout installed: its plugin would not import
	$(BIN)/python -m pip uninstall --quiet --disable-pip-version-check -y hydra-optuna-sweeper 2>/dev/null || true
	touch $@

# the optional `cluster` extra: Ray and SLURM (submitit) launchers for sweeps
setup-cluster: $(VENV)/.installed-cluster

$(VENV)/.installed-cluster: $(VENV)/.installed requirements-cluster.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-cluster.lock
	touch $@

# the optional `bench` extra: PyTorch, only as the benchmark's peer
setup-bench: $(VENV)/.installed-bench

$(VENV)/.installed-bench: $(VENV)/.installed requirements-bench.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-bench.lock
	touch $@

bench: setup-bench data
	python -m benchmarks.bench --torch --scale --sweeps --search

# a team's stack on this machine, on loopback: PostgreSQL, an mlflow server on it, a Ray head (docs/team.md);
# other ports or folder: make team-up TEAM_ARGS="--mlflow-port 5001 --pg-port 5434 --ray-port 6380 --dir <folder>"
team-up: setup-cluster data
	python -m pipeline.team up $(TEAM_ARGS)

team-down:
	python -m pipeline.team down $(TEAM_ARGS)

data: setup
	dvc pull data/raw.dvc

# what the pipeline made that git does not track (models/.gitignore and the committed
# reports/train_history.csv stay), and the environments pipeline.reproduce built
clean:
	rm -rf outputs multirun data/flat models/*.npz reports/*.json reports/*.png reports/compare .cache/envs
