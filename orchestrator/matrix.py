"""Coarse-to-fine matrices: `grafit matrix jobs/matrix/X.yaml` (paper Tables 3-4, Fig. 3).

Every (method, training level) cell is one trial of a Tune sweep over `method.name` x
`data.train_level` (so cells run through the Ray Train/Tune path and get their own nested MLflow
runs); each trial evaluates every test level. The parent run then holds the matrices: metrics
`<metric>/<method>/train_<level>/test_<level>`, `matrices.json`, one CSV per metric, a heatmap
per (metric, method) and the Fig. 3-style lines. At level `none`, methods without a label-free
loss are skipped (blank cells), not reported; conditioned and oracle mAP at a test level not finer
than the training level are not results ("–").
"""
from __future__ import annotations

import csv
import io
import math

from orchestrator import figures, tracking
from orchestrator.journal import Journal
from orchestrator.prepare import launch, max_failures, prepare
from orchestrator.sweep import check_definition, run_sweep

METRICS = ("knn_top1", "map_cosine", "map_at_r", "map_cond", "map_oracle", "finetune_top1")
CONDITIONED = ("map_cond", "map_oracle")     # rank by the training level's classes: only finer levels say anything
UNSEEN = "/unseen"                            # the suffix of a column of held-out classes (data.unseen)
NOT_MEANINGFUL = "–"                          # how such a cell is shown (None in the JSON, absent in MLflow)


def meaningful(metric: str, train_level: str, test_level: str, levels: list[str]) -> bool:
    """Conditioned or oracle mAP at a test level not finer than the training level is not a result
    (oracle ranking then sorts by the test label itself); on the held-out classes (`<level>/unseen`)
    neither they (p_c has no entry for a class never trained on) nor fine-tuning are."""
    if UNSEEN in test_level:
        return metric not in (*CONDITIONED, "finetune_top1")
    return (metric not in CONDITIONED or train_level not in levels
            or levels.index(test_level) > levels.index(train_level))


def assemble(grid, test_levels: list[str], levels: list[str] | None = None) -> dict:
    """{metric: {method: {train_level: {test_level: value or None (not meaningful)}}}} from the
    trials' final metrics; test_levels: the columns (Prepared.columns); levels: the dataset's,
    coarse -> fine (default the test levels)."""
    out, levels = {metric: {} for metric in METRICS}, levels or test_levels
    for r in grid:
        if r.error is not None or not r.metrics or not r.metrics.get("trained"):
            continue
        method, level = r.config["method.name"], r.config["data.train_level"]
        for metric in METRICS:
            shown = {lv: meaningful(metric, level, lv, levels) for lv in test_levels}
            cells = {lv: r.metrics[f"{metric}/{lv}"] if shown[lv] else None
                     for lv in test_levels if f"{metric}/{lv}" in r.metrics or (UNSEEN in lv and not shown[lv])}
            if cells:
                out[metric].setdefault(method, {})[level] = cells
    for metric in ("finetune_top1", "map_at_r"):   # only with matrix.finetune / from runs that have it
        if not any(v is not None for rows in out[metric].values() for cells in rows.values() for v in cells.values()):
            del out[metric]
    return out


def flat_metrics(matrices: dict) -> dict:
    return {f"{metric}/{method}/train_{tl}/test_{lv}": v
            for metric, per_method in matrices.items() for method, rows in per_method.items()
            for tl, cells in rows.items() for lv, v in cells.items() if v is not None}


def cell_text(cells: dict | None, level: str, fmt) -> str:
    """A value, "skipped" (no result: a skipped or failed cell) or "–" (not a meaningful metric)."""
    if not cells or level not in cells or (cells[level] is not None and math.isnan(cells[level])):
        return "skipped"
    return NOT_MEANINGFUL if cells[level] is None else fmt(cells[level])


def to_csv(per_method: dict, train_levels: list[str], test_levels: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "train_level", *[f"test_{lv}" for lv in test_levels]])
    for method, rows in per_method.items():
        for tl in train_levels:
            cells = rows.get(tl)
            writer.writerow([method, tl, *[cell_text(cells, lv, lambda v: f"{v:.6f}") for lv in test_levels]])
    return buf.getvalue()


def artifacts(matrices: dict, train_levels: list[str], test_levels: list[str]):
    """Yield (name, CSV text or figure) for every matrix: the CSV, a heatmap per method, Fig. 3 lines."""
    for metric, per_method in matrices.items():
        yield f"{metric}.csv", to_csv(per_method, train_levels, test_levels)
        for method, rows in per_method.items():
            yield f"heatmap_{metric}_{method}.png", figures.heatmap(rows, train_levels, test_levels,
                                                                   f"{method}: {metric} (%)")
        if per_method:                       # Fig. 3: at the finest level of the seen classes
            finest = [lv for lv in test_levels if UNSEEN not in lv][-1]
            yield f"levels_{metric}.png", figures.level_lines(per_method, train_levels, finest, metric)


def log_matrices(log: Journal, matrices: dict, train_levels: list[str], test_levels: list[str]) -> None:
    """Everything the parent run shows: metrics, JSON, CSVs, heatmaps, Fig. 3 lines."""
    log.log_metrics(flat_metrics(matrices), step=0)
    log.log_dict({"train_levels": train_levels, "test_levels": test_levels, "matrices": matrices},
                 "matrices/matrices.json")
    for name, item in artifacts(matrices, train_levels, test_levels):
        figures.log_item(log, item, name)


def print_matrices(matrices: dict, train_levels: list[str], test_levels: list[str]) -> None:
    for metric, per_method in matrices.items():
        for method, rows in per_method.items():
            print(f"\n== {metric} (%) of {method}: rows = training level, columns = test level ==")
            print(format_matrix(rows, train_levels, test_levels))


def format_matrix(rows: dict, train_levels: list[str], test_levels: list[str]) -> str:
    width, col = max(len(tl) for tl in train_levels) + 6, max(18, *(len(lv) + 7 for lv in test_levels))
    lines = [" " * width + "".join(f"{'test ' + lv:>{col}s}" for lv in test_levels)]
    for tl in train_levels:
        cells = rows.get(tl, {})
        lines.append(f"{'train ' + tl:<{width}s}" + "".join(
            f"{cell_text(cells, lv, lambda v: f'{100 * v:.1f}'):>{col}s}" for lv in test_levels))
    return "\n".join(lines)


def example_figures(log: Journal, grid, train, query, train_levels: list[str], test_levels: list[str],
                    n_queries: int = 4, max_collection: int = 200_000) -> None:
    """Fig. 1 (queries with their top-10 for the CE baseline and for Grafit, correct ones green) and
    Fig. 4 (t-SNE of one coarse class coloured by fine class), from the cells trained at the
    coarsest supervised level. Runs on the driver from the cells' checkpoints."""
    import numpy as np
    import torch

    from grafit_core.checkpoint import load_trained
    from grafit_core.distributed import DistContext
    from grafit_core.engine import embed

    level = next((tl for tl in train_levels if tl != "none"), None)
    ckpts = {r.config["method.name"]: r.metrics.get("checkpoint_dir") for r in grid
             if r.error is None and r.metrics and r.metrics.get("trained") and r.config["data.train_level"] == level}
    ours = next((m for m in ckpts if m != "ce"), None)
    if level is None or "ce" not in ckpts or ours is None or len(train) > max_collection:
        return
    fine = test_levels[-1]
    fine_train, fine_query = train.labels_at(fine), query.labels_at(fine)
    picks = [int(i) for i in np.linspace(0, len(query) - 1, n_queries)]
    rows = []
    for name in ("ce", ours):
        cfg, method, meta = load_trained(ckpts[name])
        tf = meta["pipeline"].transform()
        bank, _ = embed(method, train, cfg, DistContext(), tf)
        zq, _ = embed(method, query, cfg, DistContext(), tf, rows=picks)
        for q, z in zip(picks, zq):
            top = torch.sort(bank @ z, descending=True, stable=True).indices[:10].tolist()   # ties: lower row
            rows.append({"label": f"{name}\n{train.hierarchy.classes[fine][fine_query[q]]}",
                         "query": query.image(q), "results": [train.image(i) for i in top],
                         "correct": [bool(fine_train[i] == fine_query[q]) for i in top]})
        if name == ours:
            members = np.nonzero(train.labels_at(level) == 0)[0]
            fig = figures.tsne_map(bank[members].numpy(), fine_train[members].tolist(), train.hierarchy.classes[fine],
                                   f"{ours} trained on {level}: {train.hierarchy.classes[level][0]} by {fine}")
            figures.log_item(log, fig, "tsne.png")
    rows = [r for pair in zip(rows[:n_queries], rows[n_queries:]) for r in pair]   # baseline above ours
    figures.log_item(log, figures.retrieval_grid(rows), "retrieval_grid.png")


def cmd_matrix(args) -> int:
    """Train every method at every training level, test at every level, log the matrices."""
    prep = prepare("matrix", args)
    job, levels = prep.job, prep.levels
    train_levels = job.matrix.train_levels
    print(f"matrix {job.config.name}: {len(job.matrix.methods)} methods x {len(train_levels)} training levels "
          f"= {len(job.matrix.methods) * len(train_levels)} cells, tested at {', '.join(levels)}", flush=True)
    check_definition(job, args.storage_path, prep.fingerprint)
    if not launch(prep):
        return 0
    matrices = {}

    def after(grid, log):
        matrices.update(assemble(grid, prep.columns, prep.train.hierarchy.levels))
        log_matrices(log, matrices, train_levels, prep.columns)
        example_figures(log, grid, prep.train, prep.query, train_levels, levels)

    grid, parent = run_sweep(prep, storage_path=args.storage_path, after=after,
                             max_failures=max_failures(args, job.sweep.worker_range))
    print_matrices(matrices, train_levels, prep.columns)
    print("\n" + tracking.where(tracking.tracking_uri(), parent, "parent run (matrices, heatmaps, one child run per "
                                                            "cell)", experiment=True))
    return 0 if grid.num_errors == 0 else 1
