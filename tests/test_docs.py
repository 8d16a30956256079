"""What a user reads: a short README for users, docs that describe the code as it is, DVC views
that work offline."""

from __future__ import annotations

import re

import yaml

from pipeline.common import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a commit hash as history quotes it: 7 to 40 hex digits with at least one letter and one digit
COMMIT = re.compile(r"(?<![0-9A-Za-z_/.-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![0-9A-Za-z_-])")


def test_the_readme_is_short_and_says_what_to_type():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for command in ("make run", "make test", "python -m pipeline -m hparams_search=optuna", "hydra.sweeper.n_trials", "optuna-dashboard",
                    "mlflow ui", "dvc exp run", "dvc plots show", "pipeline.register run_id=", "pipeline.predict",
                    "pipeline.reproduce run_id=", "make team-up", "make team-down", "source team/env", "hydra/launcher=slurm"):
        assert command in text, command
    assert "| knob | default | meaning |" in text


def test_readme_and_docs_quote_no_commits_and_link_only_to_what_exists():
    for doc in DOCS:
        text = doc.read_text()
        assert not COMMIT.findall(text), (doc.name, COMMIT.findall(text))
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" not in target:
                assert (doc.parent / target).exists(), (doc.name, target)


def test_the_commit_pattern_finds_hashes_and_nothing_else():
    assert COMMIT.findall("on 15d752f and 902b7b5, then c7e12d7.") == ["15d752f", "902b7b5", "c7e12d7"]
    assert not COMMIT.findall("12288 inputs, 0.000214, models:/m-0b79279272124c2bb0af11d44fb726b6, deadbeef")


def test_benchmark_results_say_where_and_when_they_were_measured():
    text = (ROOT / "benchmarks" / "results.md").read_text()
    assert re.search(r"^- machine: .+cores", text, re.M) and re.search(r"^- date: \d{4}-\d\d-\d\d", text, re.M)
    assert "python -m benchmarks.bench" in text


def test_dvc_plots_are_images_which_render_without_a_network():
    """DVC renders a data plot (csv, json) with Vega scripts loaded from a CDN: offline, a blank page."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    plots = [next(iter(p)) if isinstance(p, dict) else p for p in dvc.get("plots", [])]
    for stage in dvc["stages"].values():
        plots += [next(iter(p)) if isinstance(p, dict) else p for p in stage.get("plots", [])]
    assert plots and all(p.endswith((".png", ".svg", ".jpg")) for p in plots), plots
