"""`grafit report RUN_OR_EXPERIMENT`: rebuild tables and figures from what MLflow holds.

A matrix run -> its matrices (printed) with CSVs, heatmaps and Fig. 3 lines written to a folder;
a sweep -> the table of its trials; a single run -> its final metrics per level.
"""
from __future__ import annotations

import json
import os

from grafit_core.errors import GrafitError
from orchestrator import figures, matrix, tracking


def resolve_run(uri: str, ref: str):
    """A run id, or an experiment name (its most recent top-level run)."""
    c = tracking.client(uri)
    try:
        return c.get_run(ref)
    except Exception:                       # not a run id: try an experiment name
        pass
    exp = c.get_experiment_by_name(ref)
    if exp is None:
        raise GrafitError(f"{ref!r}: neither a run id nor an experiment in {uri}")
    runs = [r for r in c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
            if "mlflow.parentRunId" not in r.data.tags]
    if not runs:
        raise GrafitError(f"experiment {ref!r} has no runs")
    return runs[0]


def report(uri: str, ref: str, out_dir: str) -> list[str]:
    """Print the report of a run and write its figures; returns the files written."""
    c = tracking.client(uri)
    run = resolve_run(uri, ref)
    rid = run.info.run_id
    print(f"run {rid} ({run.info.run_name}, {run.info.status}) in {uri}")
    artifacts = {a.path for a in c.list_artifacts(rid, "matrices")}
    os.makedirs(out_dir, exist_ok=True)
    if "matrices/matrices.json" in artifacts:
        return _matrix_report(c, rid, out_dir)
    children = c.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{rid}'")
    if children:
        _sweep_report(run, children)
        return []
    for lv in levels_in([run]):
        m = run.data.metrics
        print(f"  {lv}: " + ", ".join(f"{k} {100 * m[f'{k}/{lv}']:.1f}" for k in matrix.METRICS if f"{k}/{lv}" in m))
    return []


def levels_in(runs) -> list[str]:
    """The test levels the runs' final metrics hold: `<level>`, and `<level>/unseen` (data.unseen)."""
    return sorted({k.split("/", 1)[1] for r in runs for k in r.data.metrics
                   if k.startswith("knn_top1/") and (k.count("/") == 1 or k.endswith(matrix.UNSEEN))})


def _matrix_report(c, rid: str, out_dir: str) -> list[str]:
    data = json.load(open(c.download_artifacts(rid, "matrices/matrices.json", out_dir)))
    train_levels, test_levels, matrices = data["train_levels"], data["test_levels"], data["matrices"]
    matrix.print_matrices(matrices, train_levels, test_levels)
    written = [figures.save(item, os.path.join(out_dir, name))
               for name, item in matrix.artifacts(matrices, train_levels, test_levels)]
    print(f"\nfigures and CSVs written to {out_dir}")
    return written


def _sweep_report(run, children) -> None:
    """The trials' table, then (with replicates) the configurations' means: never mixed in one table."""
    # params are flattened: sweep.space.<key>.<grid|choice|uniform|loguniform>
    swept = sorted({k[len("sweep.space."):].rsplit(".", 1)[0] for k in run.data.params if k.startswith("sweep.space.")})
    keys = [f"{m}/{lv}" for lv in levels_in(children) for m in ("knn_top1", "map_cosine", "map_cond")]
    means = [r for r in children if r.data.tags.get("grafit.kind") == "aggregate"]
    trials = [r for r in children if r not in means]
    print(f"{len(trials)} trials of {run.info.run_name}; best: {run.data.tags.get('best.run_id', '-')}")
    for title, runs in (("", trials), (f"\nmeans over replicates ({len(means)} configurations):", means)):
        if not runs:
            continue
        if title:
            print(title)
        print("  ".join(["run", "status", *swept, *keys]))
        for r in sorted(runs, key=lambda r: r.info.run_name):
            cells = [r.info.run_name.split("/")[-1], r.info.status, *[r.data.params.get(p, "-") for p in swept]]
            cells += [f"{100 * r.data.metrics[k]:.1f}" if k in r.data.metrics else "-" for k in keys]
            print("  ".join(cells))
