"""The house rules, read from the source itself: who may import MLflow, what the library may
know, which code each DVC stage depends on, and the guard around the one Hydra patch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("pipeline", "catnet")


def module_file(name: str) -> Path | None:
    """The file of a project module (pipeline.* under pipeline/, catnet.* under src/catnet/)."""
    parts = name.split(".")
    if parts[0] not in PROJECT:
        return None
    base = ROOT / ("src" if parts[0] == "catnet" else "") / Path(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imports_of(path: Path, anywhere: bool = True) -> set[str]:
    """Project modules ``path`` imports: at module level, or (``anywhere``) also inside functions."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if anywhere else iter(tree.body)
    package = ".".join(path.relative_to(ROOT / ("src" if "src" in path.parts else "")).with_suffix("").parts[:-1])
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}")}
    out = set()
    for name in found:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            if module_file(".".join(parts[:i])):
                out.add(".".join(parts[:i]))
    return out


def closure(module: str) -> set[Path]:
    """Every project file that running ``python -m <module>`` may import."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += sorted(imports_of(path))
    return seen


def all_modules() -> list[Path]:
    return sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "src/catnet").rglob("*.py")])


def test_only_the_tracking_package_imports_mlflow():
    tracking = ROOT / "pipeline" / "tracking"
    offenders = []
    for path in all_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names) and tracking not in path.parents:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def import_graph() -> dict[Path, set[Path]]:
    """Each project module -> the project modules it imports, at module level or inside functions
    (a submodule importing its own package's __init__ is left out: that is how packages work)."""
    def own_package(p: Path, q: Path) -> bool:
        return q.name == "__init__.py" and q.parent in p.parents

    return {p: {q for q in map(module_file, imports_of(p)) if q and q != p and not own_package(p, q)}
            for p in all_modules()}


def test_no_import_circle_between_modules(graph=None):
    """The imports form no cycle, counting those inside functions (an import deferred into a
    function still ties the two modules together)."""
    graph = import_graph() if graph is None else graph
    state: dict[Path, int] = {}

    def visit(p: Path, stack: list[Path]) -> None:
        state[p] = 1
        for q in graph.get(p, ()):
            if state.get(q) == 1:
                raise AssertionError("import circle: " + " -> ".join(str(s.relative_to(ROOT)) for s in [*stack, p, q]))
            if q not in state:
                visit(q, [*stack, p])
        state[p] = 2

    for p in graph:
        if p not in state:
            visit(p, [])


def test_the_circle_test_sees_an_import_inside_a_function():
    """A circle made only by an import inside a function is one: the test above finds it."""
    graph = import_graph()
    store, run = ROOT / "pipeline/tracking/store.py", ROOT / "pipeline/tracking/run.py"
    assert store in graph[run]
    with pytest.raises(AssertionError, match="import circle"):
        test_no_import_circle_between_modules({**graph, store: graph[store] | {run}})


# the tracking package's layers (pipeline/tracking/__init__.py, docs/architecture.md): a module imports
# only modules of the layers above its own
TRACKING_LAYERS = [["outage"], ["store"], ["model", "pyfunc", "query"], ["run"], ["life", "reuse"], ["parent"]]


def layer_breaks(graph: dict[Path, set[Path]]) -> list[str]:
    layer = {ROOT / "pipeline/tracking" / f"{m}.py": i for i, ms in enumerate(TRACKING_LAYERS) for m in ms}
    return [f"{p.name} imports {q.name}" for p, qs in graph.items() if p in layer
            for q in qs if q in layer and layer[q] >= layer[p]]


def test_the_tracking_package_forms_layers():
    files = {p.stem for p in (ROOT / "pipeline/tracking").glob("*.py")} - {"__init__"}
    assert files == {m for ms in TRACKING_LAYERS for m in ms}, "a tracking module missing from the layers"
    graph = import_graph()
    assert layer_breaks(graph) == []
    run, model = ROOT / "pipeline/tracking/run.py", ROOT / "pipeline/tracking/model.py"
    assert layer_breaks({**graph, model: graph[model] | {run}}) == ["model.py imports run.py"]  # it can fail


def test_the_tracking_package_stays_small():
    """What talks to MLflow: at most 1,500 lines, no module over 300."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "pipeline/tracking").glob("*.py")}
    assert sum(sizes.values()) <= 1500, sizes
    assert {name: n for name, n in sizes.items() if n > 300} == {}


def test_no_module_of_the_project_is_over_400_lines():
    sources = [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("src/catnet/*.py"), *ROOT.glob("hydra_plugins/**/*.py"),
               *ROOT.glob("benchmarks/*.py")]
    assert len(sources) > 30
    assert {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > 400} == {}


def test_the_library_knows_nothing_of_the_pipeline():
    """src/catnet imports no pipeline, Hydra, OmegaConf, MLflow or DVC, and its messages name
    its own parameters, not config keys (pipeline/config.py KNOBS maps one to the other)."""
    banned = ("pipeline", "hydra", "omegaconf", "mlflow", "dvc")
    key = re.compile(r"(?<![\w./])(data|train|model|normalize|tracking|sweep|paths)\.[a-z_]+\b")
    found = []
    for path in sorted((ROOT / "src/catnet").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: imports {n}" for n in names if n.split(".")[0] in banned]
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found += [f"{path.name}:{node.lineno}: {m.group(0)}" for m in key.finditer(node.value)]
                if re.search(r"\bdvc\b", node.value, re.I):
                    found.append(f"{path.name}:{node.lineno}: mentions DVC")
    assert found == []


def test_every_library_parameter_error_maps_to_a_config_key():
    from catnet.errors import BadValue
    from pipeline.config import KNOBS

    params = set()
    for path in sorted((ROOT / "src/catnet").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("BadValue", "check_choice")
                    and node.args and isinstance(node.args[0], ast.Constant)):
                params.add(node.args[0].value)
    assert params and params <= set(KNOBS), params - set(KNOBS)
    assert BadValue("lr", 0, "must be > 0").message(KNOBS) == "train.lr=0: must be > 0"


@pytest.mark.parametrize("stage", ["load", "normalize", "train", "evaluate"])
def test_each_dvc_stage_depends_on_every_module_it_runs(stage):
    """Editing any module a stage imports (hflip, the folds, the row readers...) makes that
    stage stale; and a stage lists no module it does not run."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    module = spec["cmd"].split("python -m ", 1)[1].split()[0]
    code_deps = [ROOT / d for d in spec["deps"] if d.startswith(("pipeline", "src"))]
    imported = closure(module)
    assert imported, module
    uncovered = sorted(str(p.relative_to(ROOT)) for p in imported
                       if not any(p == d or d in p.parents for d in code_deps))
    assert uncovered == [], f"dvc.yaml stage {stage} misses deps: {uncovered}"
    unused = sorted(str(d.relative_to(ROOT)) for d in code_deps
                    if not any(p == d or d in p.parents for p in imported))
    assert unused == [], f"dvc.yaml stage {stage} lists code it does not import: {unused}"


def test_dvc_lock_matches_the_code_and_config_it_was_made_from():
    """A commit that edits a stage's code or config without its dvc.lock leaves `dvc repro` in a
    fresh clone rewriting dvc.lock (and the run tagged dirty): caught here, in the fast suite."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        status = repo.status()
    stale = sorted({f"{stage}: {path}" for stage, entries in status.items() for entry in entries
                    if isinstance(entry, dict)
                    for path, state in entry.get("changed deps", {}).items() if state == "modified"})
    assert stale == [], f"dvc.lock is stale (run `make run` and commit dvc.lock): {stale}"


def test_the_hydra_patch_is_applied_only_to_the_hydra_it_was_written_for(monkeypatch):
    """A Hydra whose run_and_report takes other arguments, or of another version, keeps its own
    report: the patch must never turn a config error into a TypeError."""
    import hydra
    from hydra._internal import utils as hydra_utils

    from pipeline import common

    assert getattr(hydra_utils.run_and_report, "catnet", False)  # this Hydra: patched at import

    def newer(func, *, extra=None):  # a signature the patch was not written for
        return func()

    monkeypatch.setattr(hydra_utils, "run_and_report", newer)
    assert common._report_bad_overrides_on_one_line() is False
    assert hydra_utils.run_and_report is newer

    def same(func):
        return func()

    monkeypatch.setattr(hydra_utils, "run_and_report", same)
    monkeypatch.setattr(hydra, "__version__", "2.0.0")
    assert common._report_bad_overrides_on_one_line() is False
    assert hydra_utils.run_and_report is same
    monkeypatch.setattr(hydra, "__version__", "1.3.9")
    assert common._report_bad_overrides_on_one_line() is True
    assert hydra_utils.run_and_report is not same and hydra_utils.run_and_report.catnet


@pytest.mark.parametrize("setting, client", [(None, False), ("false", True)])
def test_mlflow_usage_telemetry_is_off_unless_the_user_turns_it_on(setting, client):
    """MLflow's telemetry would fetch its settings from the internet and send events from every
    process; MLflow itself stays quiet under CI and pytest, so the child runs without their marks."""
    import os
    import subprocess
    import sys

    from pipeline.common import ROOT

    env = {k: v for k, v in os.environ.items()
           if k not in ("CI", "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    if setting is not None:
        env["MLFLOW_DISABLE_TELEMETRY"] = setting
    code = "import pipeline.tracking, mlflow.telemetry as t; print(t.get_telemetry_client() is not None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(client)


@pytest.mark.parametrize("module, name", [
    ("hydra_plugins.hydra_joblib_launcher._core", "process_joblib_cfg"),  # pipeline/sweep.py: warm_joblib_workers
    ("hydra._internal.utils", "run_and_report"),  # pipeline/common.py: the one-line report of a bad override
    ("hydra._internal.core_plugins.basic_sweeper", "BasicSweeper"),  # hydra_plugins/catnet_sweeper/
    ("hydra._internal.config_loader_impl", "ConfigLoaderImpl"),
    ("hydra._internal.config_loader_impl", "get_overrides_dirname"),
])
def test_the_private_names_catnet_borrows_are_still_there(module, name):
    """Each private name of another package that catnet uses is confined to one place (named
    beside it); if an upgrade moves it, this says which."""
    import importlib

    assert callable(getattr(importlib.import_module(module), name, None)), f"{module}.{name} moved"


# what reaches into a library's private parts, outside MLflow, with why; MLflow's own: none at all
PRIVATE_ALLOWED = {
    ("pipeline/curve.py", "_exit"),  # os._exit: the curve helper's end, no interpreter teardown
    ("hydra_plugins/catnet_sweeper/composed_once.py", "_apply_overrides_to_config"),  # Hydra's, as its sweeper
    ("hydra_plugins/catnet_sweeper/optuna_search.py", "_trial_id"),  # Optuna's trial, to ask it in a job
    ("hydra_plugins/catnet_sweeper/optuna_search.py", "_storage"),
}


def private_uses(sources: dict[str, str]) -> list[str]:
    """``file:line what`` for each import from ``mlflow.store`` or of a private MLflow name, each
    ``obj._name`` that is not catnet's own, and each patch of MLflow's, Python's or logging's
    process-wide state (an attribute of ``mlflow``, ``warnings``, ``sys`` assigned)."""
    trees = {name: ast.parse(text) for name, text in sources.items()}
    ours = set()
    for tree in trees.values():
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                ours.add(n.name)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                ours.add(n.id)
            elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and not _patches(n):
                ours.add(n.attr)
            elif isinstance(n, ast.arg):
                ours.add(n.arg)
    found = []
    for name, tree in trees.items():
        for n in ast.walk(tree):
            at = f"{name}:{getattr(n, 'lineno', 0)}"
            if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "mlflow":
                if (n.module.startswith("mlflow.store") or any(p.startswith("_") for p in n.module.split("."))
                        or any(a.name.startswith("_") for a in n.names)):
                    found.append(f"{at} from {n.module} import {', '.join(a.name for a in n.names)}")
            elif isinstance(n, ast.Import):
                found += [f"{at} import {a.name}" for a in n.names
                          if a.name.startswith("mlflow.store") or (a.name.startswith("mlflow.") and "._" in a.name)]
            elif isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__"):
                if n.attr not in ours and (name, n.attr) not in PRIVATE_ALLOWED:
                    found.append(f"{at} .{n.attr}")
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and _patches(n):
                found.append(f"{at} patches {ast.unparse(n)}")
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and re.match(r"mlflow\.(store\b|.*\._)", n.value):
                found.append(f"{at} names {n.value}")  # importlib.import_module("mlflow.store...")
    return sorted(found)


def _patches(node: ast.Attribute) -> bool:
    root = node
    while isinstance(root, ast.Attribute):
        root = root.value
    return getattr(root, "id", None) in ("mlflow", "warnings", "sys", "builtins", "requirements_utils")


def test_mlflow_is_used_through_its_public_api_only():
    """No private name of MLflow, no import from ``mlflow.store``, no patch of MLflow's or Python's
    process-wide state, in any of catnet's code (tests aside)."""
    sources = {str(p.relative_to(ROOT)): p.read_text()
               for p in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("hydra_plugins/**/*.py"), *ROOT.glob("src/**/*.py")]}
    assert len(sources) > 30
    assert private_uses(sources) == []
    broken = {  # what it must catch: the kinds of use the tracking package once made
        "a.py": "from mlflow.store.tracking.dbmodels.models import SqlMetric\n",
        "b.py": "def f(client):\n    return client._tracking_client.store\n",
        "c.py": "from mlflow.utils import requirements_utils\nrequirements_utils._MODULES_TO_PACKAGES = {}\n",
        "d.py": "import warnings\nwarnings.showwarning = print\n",
        "e.py": "from mlflow.utils.validation import _validate_metric\n",
        "f.py": "import importlib\nimportlib.import_module('mlflow.store.tracking.sqlalchemy_store')\n",
    }
    assert [line.split()[0] for line in private_uses(broken)] == [
        "a.py:1", "b.py:2", "c.py:2", "c.py:2", "d.py:2", "e.py:1", "f.py:2"]
