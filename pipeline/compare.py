"""``python -m pipeline.compare``: a table and a plot comparing the runs of an experiment or sweep.

    python -m pipeline.compare experiment=catnet
    python -m pipeline.compare experiment=catnet parent=<sweep parent run id>

Reads the runs through pipeline/tracking (query.finished_runs_frame); writes reports/compare/runs.{md,csv} (the params
that differ between the runs, the key metrics, sorted by the objective) and
reports/compare/error_curves.png (the per-epoch training error of every run, overlaid).
Prints the table; with ``parent`` also logs both files to that run under ``compare/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from catnet.errors import ConfigError
from catnet.metrics import HEADLINE
from pipeline.common import CONF_DIR, atomic_write, log, resolve, run_cli, run_main
from pipeline.config import TrackingConfig, metric_key

# the table's metrics: each set's headline measures (catnet.metrics.HEADLINE), validation first
KEY_METRICS = [metric_key(split, measure) for split in ("val", "train", "test") for measure in HEADLINE]


@dataclass
class CompareConfig:
    experiment: str = "catnet"
    parent: Optional[str] = None  # a sweep's parent run: compare its children only
    objective: str = "val/balanced_accuracy"  # sort key; then cv/balanced_accuracy, then ``fallback``
    fallback: str = "train/balanced_accuracy"
    direction: str = "maximize"
    max_runs: int = 200
    max_curves: int = 20  # the plot shows the best runs only
    out_dir: str = "reports/compare"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


ConfigStore.instance().store(name="compare_schema", node=CompareConfig)


def compare(cfg: DictConfig):
    import pandas as pd

    from pipeline.tracking import parent, query, store

    order = query.metric_order(cfg.objective, cfg.fallback)  # refuses a test/ metric first
    client, experiment_id = store.open_store(cfg, experiment=cfg.experiment, create=False)
    top = query.run_of(client, cfg.parent, "parent").info.run_id if cfg.parent else None
    runs = query.finished_runs_frame(experiment_id, top, cfg.max_runs)
    if runs.empty:
        raise ConfigError(f"no finished runs in experiment {cfg.experiment!r}"
                          + (f" under parent {cfg.parent}" if cfg.parent else "")
                          + f" of {client.tracking_uri} (another store, a team's server: tracking.uri=http://<server>:5000)")

    # the one ranking rule: the runs that have its metric, best first, then the others
    rows = [r for _, r in runs.iterrows()]
    metrics_of = lambda r: {c[8:]: r[c] for c in runs if c.startswith("metrics.") and pd.notna(r[c])}  # noqa: E731
    objective, ranked = query.rank(rows, metrics_of, order, cfg.direction)
    ranked_ids = [r["run_id"] for r in ranked]
    runs = pd.concat([runs.set_index("run_id").loc[ranked_ids].reset_index(),
                      runs[~runs["run_id"].isin(ranked_ids)]], ignore_index=True)
    # the pipeline's params (the flattened config: seed and dotted keys), where runs differ
    params = [c for c in runs if c.startswith("params.") and ("." in c[7:] or c == "params.seed")
              and runs[c].nunique(dropna=False) > 1]
    metrics = [f"metrics.{m}" for m in dict.fromkeys([objective, *KEY_METRICS]) if f"metrics.{m}" in runs]
    table = runs[["run_id", "tags.mlflow.runName", *params, *metrics]].copy()
    table.columns = ["run_id", "run_name", *(c.split(".", 1)[1] for c in params + metrics)]
    table["run_id"] = table["run_id"].str[:8]

    out = resolve(cfg.out_dir)
    md, csv, png = out / "runs.md", out / "runs.csv", out / "error_curves.png"
    # in the printed table a sweep's run names (its overrides) would repeat the param columns
    shown = table.assign(run_name=table["run_name"].fillna("").map(lambda n: n if len(n) <= 40 else n[:39] + "~"))
    text = shown.to_markdown(index=False, floatfmt=".4g")
    atomic_write(md, lambda f: f.write(f"Sorted by {objective or 'nothing'} ({cfg.direction}).\n\n{text}\n"),
                 mode="w")
    atomic_write(csv, lambda f: table.to_csv(f, index=False), mode="w")
    histories = {  # labelled like the table's rows: short run id and objective
        f"{r['run_id'][:8]}" + (f" {objective} {r[f'metrics.{objective}']:.4g}" if objective else ""): pd.DataFrame(
            query.metric_history(client, _trained_by(r), "train/error"),
            columns=["epoch", "error"])
        for _, r in runs.loc[table.index[: cfg.max_curves]].iterrows()  # the table keeps runs' row labels
    }
    atomic_write(png, lambda f: _plot(f, histories), mode="wb")
    print(text)
    if cfg.parent:
        parent.attach(client, top, (md, csv, png), "compare")
    log.info("compare: %d runs -> %s, %s, %s", len(table), md, csv, png)
    return table


def _trained_by(row) -> str:
    """The run whose curve a row shows: a reused job's link shows the run that trained."""
    origin = row.get("tags.catnet.reused_from")
    return origin if isinstance(origin, str) and origin else row["run_id"]


def _plot(f, histories) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for name, h in histories.items():
        ax.plot(h["epoch"], h["error"], label=name[:60], linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training error")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(f, format="png")
    plt.close(fig)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="compare")
def main(cfg: DictConfig) -> None:
    run_cli(compare, cfg, validate=False)


if __name__ == "__main__":
    run_main(main)
