"""Coarse-to-fine matrices: `grafit matrix jobs/matrix/X.yaml` (paper Tables 3-4, Fig. 3).

Every (method, training level) cell is one trial of a Tune sweep over `method.name` x
`data.train_level` (so cells run through the Ray Train/Tune path and get their own nested MLflow
runs); each trial evaluates every test level. The parent run then holds the matrices: metrics
`<metric>/<method>/train_<level>/test_<level>`, `matrices.json`, one CSV per metric, a heatmap
per (metric, method) and the Fig. 3-style lines. At level `none`, methods without a label-free
loss are skipped (blank cells), not reported.
"""
from __future__ import annotations

import csv
import io
import math

from grafit_core.config import Config, with_overrides
from orchestrator import figures, tracking

METRICS = ("knn_top1", "map_cosine", "map_cond", "map_oracle")


def matrix_sweep(cfg: Config, levels: list[str]) -> Config:
    """The sweep that runs every cell: a FIFO grid over methods x training levels."""
    m = cfg.matrix
    methods = m.methods or [cfg.method.name]
    train_levels = m.train_levels or ["none", *levels]
    space = {"method.name": {"grid": methods}, "data.train_level": {"grid": train_levels}}
    return with_overrides(cfg, {"sweep.space": space, "sweep.scheduler": "fifo",
                                "matrix.methods": methods, "matrix.train_levels": train_levels})


def assemble(grid, test_levels: list[str]) -> dict:
    """{metric: {method: {train_level: {test_level: value}}}} from the trials' final metrics."""
    out = {metric: {} for metric in METRICS}
    for r in grid:
        if r.error is not None or not r.metrics or not r.metrics.get("trained"):
            continue
        method, level = r.config["method.name"], r.config["data.train_level"]
        for metric in METRICS:
            cells = {lv: r.metrics[f"{metric}/{lv}"] for lv in test_levels if f"{metric}/{lv}" in r.metrics}
            if cells:
                out[metric].setdefault(method, {})[level] = cells
    return out


def flat_metrics(matrices: dict) -> dict:
    return {f"{metric}/{method}/train_{tl}/test_{lv}": v
            for metric, per_method in matrices.items() for method, rows in per_method.items()
            for tl, cells in rows.items() for lv, v in cells.items()}


def to_csv(per_method: dict, train_levels: list[str], test_levels: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "train_level", *[f"test_{lv}" for lv in test_levels]])
    for method, rows in per_method.items():
        for tl in train_levels:
            cells = rows.get(tl)
            writer.writerow([method, tl, *[("skipped" if (cells or {}).get(lv) is None else f"{cells[lv]:.6f}")
                                           for lv in test_levels]])
    return buf.getvalue()


def log_matrices(uri: str, run_id: str, matrices: dict, train_levels: list[str], test_levels: list[str]) -> None:
    """Everything the parent run shows: metrics, JSON, CSVs, heatmaps, Fig. 3 lines."""
    c = tracking.client(uri)
    tracking.log_metrics(uri, run_id, flat_metrics(matrices))
    c.log_dict(run_id, {"train_levels": train_levels, "test_levels": test_levels, "matrices": matrices},
               "matrices/matrices.json")
    for metric, per_method in matrices.items():
        c.log_text(run_id, to_csv(per_method, train_levels, test_levels), f"matrices/{metric}.csv")
        for method, rows in per_method.items():
            fig = figures.heatmap(rows, train_levels, test_levels, f"{method}: {metric} (%)")
            c.log_figure(run_id, fig, f"figures/heatmap_{metric}_{method}.png")
            figures.plt.close(fig)
        if per_method:
            fig = figures.level_lines(per_method, train_levels, test_levels[-1], metric)
            c.log_figure(run_id, fig, f"figures/levels_{metric}.png")
            figures.plt.close(fig)


def format_matrix(rows: dict, train_levels: list[str], test_levels: list[str]) -> str:
    width = max(len(tl) for tl in train_levels) + 6
    lines = [" " * width + "".join(f"{'test ' + lv:>18s}" for lv in test_levels)]
    for tl in train_levels:
        cells = rows.get(tl, {})
        lines.append(f"{'train ' + tl:<{width}s}" + "".join(
            f"{'skipped' if math.isnan(cells.get(lv, math.nan)) else f'{100 * cells[lv]:.1f}':>18s}"
            for lv in test_levels))
    return "\n".join(lines)
