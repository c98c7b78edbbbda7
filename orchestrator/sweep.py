"""Sweeps: `grafit sweep jobs/sweeps/X.yaml` (Ray Tune over Train V2, tracked in MLflow).

Ray 2.60 wants a Tuner over a *driver function* that builds one TorchTrainer per trial and
forwards rank 0's per-epoch reports to Tune (TuneReportCallback); `Tuner(TorchTrainer)` fails.
Tune samples only training parameters (sweep.space); evaluation-only values (sweep.eval_grid:
k, voting sigma) are all evaluated inside each trial from its one set of embeddings.
MLflow: one parent run per sweep, one nested child run per trial, the best trial on the parent;
everything the driver writes goes through the parent's journal (orchestrator.journal).
"""
from __future__ import annotations

import math
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from grafit_core.config import with_overrides
from grafit_core.data import NONE_LEVEL
from grafit_core.errors import GrafitError
from grafit_core.methods import get_method
from orchestrator import journal, tracking
from orchestrator.job import Job, job_dict, job_from_dict, job_with
from orchestrator.prepare import Prepared, format_table, launch, prepare
from orchestrator.workers import run_training, storage_uri, tracked_training


@dataclass
class TrialSpec:
    """What every trial driver needs besides its sampled parameters."""
    job: dict                                 # orchestrator.job.job_dict
    source: str
    uri: str
    parent_run_id: str
    fingerprint: str
    storage_path: str                         # absolute: <storage>/trials
    name: str
    max_failures: int
    test_levels: list[str]
    on_step: Optional[Callable] = None        # passed to the workers (fault injection)


def tune_space(job: Job) -> dict:
    from ray import tune
    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: make[kind](values) for key, spec in job.sweep.space.items() for kind, values in spec.items()}


def trial_fn(params: dict, spec: TrialSpec) -> None:
    """One Tune trial: a driver that trains one configuration on Ray Train workers."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    job = job_with(job_from_dict(spec.job, spec.source), params)
    cfg, sw, trial = job.config, job.sweep, tune.get_context().get_trial_id()
    if cfg.data.train_level == NONE_LEVEL and not get_method(cfg.method.name).label_free(cfg):
        # nothing to learn without labels: no workers, no run, a blank cell (the scheduler's
        # metric must still be present in the report)
        tune.report({sw.metric: float("nan"), "trained": 0, "skipped": 1})
        return
    result = tracked_training(
        job, uri=spec.uri, run_name=f"{spec.name}/{trial}", fingerprint=spec.fingerprint,
        parent_run_id=spec.parent_run_id, workers=sw.workers, cpus_per_worker=sw.cpus_per_worker,
        gpus_per_worker=sw.gpus_per_worker, storage_path=spec.storage_path, name=f"{spec.name}-{trial}",
        max_failures=spec.max_failures, callbacks=[TuneReportCallback()], on_step=spec.on_step,
        wait_s=10.0)                            # a server that is away: the sweep's end replays, not each trial
    if result.error is not None:
        raise result.error                      # Tune marks the trial failed; the sweep goes on
    final = result.return_value
    if job.matrix.finetune and not final["skipped"]:
        final["metrics"].update(finetune_cells(job, result, spec, trial))
    last_epoch = final["history"][-1] if final["history"] else {}   # keeps the scheduler's metric present
    tune.report({**last_epoch, **({} if final["skipped"] else final["metrics"]), "mlflow_run_id": result.run_id,
                 "trained": 0 if final["skipped"] else 1,
                 "checkpoint_dir": result.checkpoint.path if result.checkpoint else ""})


def finetune_cells(job: Job, result, spec: TrialSpec, trial: str) -> dict:
    """A matrix cell's fine-tuning column: its trunk fine-tuned at every test level (one Ray
    Train fit each), logged into the cell's run next to kNN and mAP."""
    out, sw = {}, job.sweep
    for level in spec.test_levels:
        ft = with_overrides(job.config, {"finetune.checkpoint": result.checkpoint.path, "finetune.level": level})
        r = run_training(ft, task="finetune", workers=sw.workers, cpus_per_worker=sw.cpus_per_worker,
                         gpus_per_worker=sw.gpus_per_worker, storage_path=spec.storage_path,
                         name=f"{spec.name}-{trial}-finetune-{level}", max_failures=spec.max_failures)
        if r.error is not None:
            raise r.error
        out[f"finetune_top1/{level}"] = r.return_value["metrics"][f"finetune_top1/{level}"]
    # into the cell's (closed) run through a journal: a server that is away does not fail the trial
    log = journal.Journal(spec.uri, result.run_id, os.path.join(spec.storage_path, f"{spec.name}-{trial}",
                                                                "mlflow_journal", "finetune.jsonl"))
    log.log_metrics(out, step=job.config.optim.epochs)
    log.close(10.0)
    return out


def run_sweep(prep: Prepared, *, storage_path: str, max_failures: int = 0, after=None,
              on_step: Callable | None = None):
    """Run the sweep on the connected Ray cluster; returns (Tune ResultGrid, parent run id).
    after(grid, parent_journal) logs more into the parent run before it is closed; the parent
    records the trial with the best final kNN top-1 at the finest test level."""
    job, uri = prep.job, tracking.tracking_uri()
    check_capacity(job.sweep)
    name = job.config.name
    parent = tracking.start_run(uri, job.experiment, f"sweep {name}", job_dict(job),
                                tracking.provenance(prep.fingerprint))
    log = journal.Journal(uri, parent, os.path.join(journal.local_dir(
        f"{storage_uri(storage_path).rstrip('/')}/{name}", parent), "parent.jsonl"))
    ok, grid, wait_s = False, None, job.tracking.offline_wait_s
    try:
        spec = TrialSpec(job_dict(job), job.source, uri, parent, prep.fingerprint,
                         storage_uri(storage_path.rstrip("/") + "/trials"), name, max_failures, prep.levels, on_step)
        grid = _fit_tuner(job, spec, storage_path)
        # the trials' own records travel through their journals; the parent's are read and
        # written now, so a server that went away during the sweep gets time to come back
        if not tracking.wait_for_server(uri, wait_s):
            raise GrafitError(f"MLflow server {uri} did not come back within {wait_s:.0f} s: "
                              f"the sweep's trials are done (their records wait in their journals, "
                              f"<storage>/trials/*/mlflow_journal: grafit sync), its parent run {parent} stays open")
        journal.replay_all(os.path.join(storage_path, "trials"), wait_s)
        record_best(log, grid, f"knn_top1/{prep.levels[-1]}")
        if after is not None:
            after(grid, log)
        ok = grid.num_errors < len(grid)
        return grid, parent
    finally:
        try:
            if grid is not None:
                close_children(log, grid)
            log.end(ok)
        except Exception as err:                 # the server is gone: say so, keep the first error
            print(f"grafit: could not close the sweep's MLflow runs in {uri} ({type(err).__name__}); "
                  f"they stay open", file=sys.stderr)
        if not log.close(wait_s):
            print(f"grafit: the sweep's parent run {parent} records wait in {log.path}: grafit sync "
                  f"{os.path.dirname(log.path)}", file=sys.stderr)


def check_capacity(sw) -> None:
    import ray
    cpus = ray.cluster_resources().get("CPU", 0)
    need = sw.max_concurrent * sw.workers * sw.cpus_per_worker
    if need > cpus + 1e-9:
        raise GrafitError(f"sweep.max_concurrent x sweep.workers x sweep.cpus_per_worker = {need:g} CPUs but "
                          f"the Ray cluster has {cpus:g}: concurrent trials would wait forever")


def max_epochs(job: Job) -> int:
    """The longest trial's epochs (optim.epochs may itself be swept)."""
    spec = job.sweep.space.get("optim.epochs")
    return int(max(next(iter(spec.values())))) if spec else job.config.optim.epochs


def _fit_tuner(job: Job, spec: TrialSpec, storage_path: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sw = job.sweep
    # one report per epoch, then the trial's final report: with max_t = epochs ASHA would stop a
    # surviving trial at its last epoch, before its evaluation and MLflow logging finish
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max_epochs(job) + 1,
                               grace_period=min(sw.grace_period, max_epochs(job)))
                 if sw.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(trial_fn, spec=spec),
                                    {"CPU": 0, "memory": 1})   # the trial driver only waits on its workers
    tuner = tune.Tuner(trainable, param_space=tune_space(job),
                       tune_config=tune.TuneConfig(metric=sw.metric, mode=sw.mode, scheduler=scheduler,
                                                   num_samples=sw.num_samples, max_concurrent_trials=sw.max_concurrent),
                       run_config=tune.RunConfig(storage_path=storage_uri(storage_path), name=job.config.name))
    return tuner.fit()


def trial_id(path: str) -> str:
    """Tune's trial id from a trial folder name: trial_fn_<experiment>_<index>_<params>_<date>."""
    return "_".join(os.path.basename(path).split("_")[2:4])


def close_children(log: journal.Journal, grid) -> None:
    """A trial stopped by the scheduler (or whose driver died) cannot close its own run: mark it
    KILLED (stopped early) or FAILED (errored), never leave it RUNNING."""
    failed = {trial_id(r.path) for r in grid if r.error is not None and r.path}
    c = tracking.client(log.uri)
    runs = c.search_runs([c.get_run(log.run_id).info.experiment_id],
                         filter_string=f"tags.mlflow.parentRunId = '{log.run_id}' and attributes.status = 'RUNNING'")
    for run in runs:
        log.end("FAILED" if run.info.run_name.split("/")[-1] in failed else "KILLED", run_id=run.info.run_id)


def record_best(log: journal.Journal, grid, final: str) -> None:
    """The best trial by final kNN top-1 at the finest test level (higher is better)."""
    rows = [r for r in grid if r.error is None and r.metrics and final in r.metrics]
    if not rows:
        return
    best = max(rows, key=lambda r: r.metrics[final])
    log.set_tags({"best.run_id": best.metrics["mlflow_run_id"], "best.config": str(dict(best.config))})
    log.log_metrics({f"best/{k}": v for k, v in best.metrics.items() if "/" in k}, step=0)


def trial_table(grid, params: list[str], keys: list[str]) -> list[dict]:
    """One row per trial: its swept values, status and final metrics."""
    rows = []
    for r in grid:
        trial = trial_id(r.path) if r.path else "?"
        stopped = r.metrics and "trained" not in r.metrics
        status = "FAILED" if r.error else ("stopped" if stopped else
                                           "skipped" if (r.metrics or {}).get("skipped") else "ok")
        row = {"trial": trial, "status": status}
        row.update({p: str(r.config.get(p)) for p in params})
        row.update({k: (r.metrics or {}).get(k, "-") for k in keys})
        rows.append(row)
    return rows


def over_seeds(rows: list[dict], params: list[str], keys: list[str]) -> list[dict]:
    """Mean ± std of each metric over trials that differ only in `seed`."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(tuple(str(row[p]) for p in params if p != "seed"), []).append(row)
    out = []
    for group_key, members in groups.items():
        row = dict(zip([p for p in params if p != "seed"], group_key), seeds=len(members))
        for k in keys:
            vals = [m[k] for m in members if isinstance(m[k], float) and not math.isnan(m[k])]
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                row[k] = f"{100 * statistics.mean(vals):.1f} ± {100 * sd:.1f}"
        out.append(row)
    return out


def cmd_sweep(args) -> int:
    """Validate the sweep against its data, run it on Ray Tune, print the trials."""
    prep = prepare("sweep", args)
    if not launch(prep):
        return 0
    grid, parent = run_sweep(prep, storage_path=args.storage_path, max_failures=args.max_failures)
    params = list(prep.job.sweep.space)
    keys = [f"{m}/{lv}" for lv in prep.levels for m in ("knn_top1", "map_cosine", "map_cond")]
    rows = trial_table(grid, params, keys)
    print(f"\n== sweep {prep.job.config.name}: {len(rows)} trials, {grid.num_errors} failed ==")
    print(format_table(rows, ["trial", "status", *params, *keys]))
    if "seed" in params:
        print("\n== mean ± std over seeds ==")
        print(format_table(over_seeds(rows, params, keys), [p for p in params if p != "seed"] + ["seeds", *keys]))
    print(f"\nMLflow parent run {parent} in {tracking.tracking_uri()}; compare the trials with: grafit ui")
    return 0 if grid.num_errors < len(rows) else 1
