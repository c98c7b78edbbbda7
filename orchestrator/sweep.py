"""Sweeps: `grafit sweep jobs/sweeps/X.yaml` (Ray Tune over Train V2, tracked in MLflow).

Ray 2.60 wants a Tuner over a *driver function* that builds one TorchTrainer per trial and
forwards rank 0's per-epoch reports to Tune (TuneReportCallback); `Tuner(TorchTrainer)` fails.
Tune samples only training parameters (sweep.space); evaluation-only values (sweep.eval_grid:
k, voting sigma) are all evaluated inside each trial from its one set of embeddings.
MLflow: one parent run per sweep, one nested child run per trial, the best trial on the parent.
"""
from __future__ import annotations

import math
import os
import statistics
import sys

from grafit_core.config import Config, config_from_dict, to_dict, with_overrides
from grafit_core.data import NONE_LEVEL
from grafit_core.methods import get_method
from grafit_core.errors import GrafitError
from orchestrator import journal, tracking
from orchestrator.train import run_training, storage_uri, tracked_training


def tune_space(cfg: Config) -> dict:
    from ray import tune
    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: make[kind](values) for key, spec in cfg.sweep.space.items() for kind, values in spec.items()}


def trial_fn(params: dict, base: dict, meta: dict) -> None:
    """One Tune trial: a driver that trains one configuration on Ray Train workers."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = with_overrides(config_from_dict(base, meta["source"]), params)
    trial = tune.get_context().get_trial_id()
    sw = cfg.sweep
    if cfg.data.train_level == NONE_LEVEL and not get_method(cfg.method.name).label_free(cfg):
        # nothing to learn without labels: no workers, no run, a blank cell (the scheduler's
        # metric must still be present in the report)
        tune.report({sw.metric: float("nan"), "trained": 0, "skipped": 1})
        return
    result = tracked_training(
        cfg, uri=meta["uri"], run_name=f"{meta['name']}/{trial}", fingerprint=meta["fingerprint"],
        parent_run_id=meta["parent_run_id"], workers=sw.workers, cpus_per_worker=sw.cpus_per_worker,
        gpus_per_worker=sw.gpus_per_worker, storage_path=meta["storage_path"], name=f"{meta['name']}-{trial}",
        max_failures=meta["max_failures"], callbacks=[TuneReportCallback()],
        wait_s=10.0)                            # a server that is away: the sweep's end replays, not each trial
    if result.error is not None:
        raise result.error                      # Tune marks the trial failed; the sweep goes on
    final = result.return_value
    if cfg.matrix.finetune and not final["skipped"]:
        final["metrics"].update(finetune_cells(cfg, result, meta, trial))
    last_epoch = final["history"][-1] if final["history"] else {}   # keeps the scheduler's metric present
    tune.report({**last_epoch, **({} if final["skipped"] else final["metrics"]), "mlflow_run_id": result.run_id,
                 "trained": 0 if final["skipped"] else 1,
                 "checkpoint_dir": result.checkpoint.path if result.checkpoint else ""})


def check_capacity(sw) -> None:
    import ray
    cpus = ray.cluster_resources().get("CPU", 0)
    need = sw.max_concurrent * sw.workers * sw.cpus_per_worker
    if need > cpus + 1e-9:
        raise GrafitError(f"sweep.max_concurrent x sweep.workers x sweep.cpus_per_worker = {need:g} CPUs but "
                          f"the Ray cluster has {cpus:g}: concurrent trials would wait forever")


def finetune_cells(cfg: Config, result, meta: dict, trial: str) -> dict:
    """A matrix cell's fine-tuning column: its trunk fine-tuned at every test level (one Ray
    Train fit each), logged into the cell's run next to kNN and mAP."""
    from orchestrator.finetune import finetune_loop
    out, sw = {}, cfg.sweep
    for level in meta["test_levels"]:
        ft = with_overrides(cfg, {"finetune.checkpoint": result.checkpoint.path, "finetune.level": level})
        r = run_training(ft, workers=sw.workers, cpus_per_worker=sw.cpus_per_worker, gpus_per_worker=sw.gpus_per_worker,
                         storage_path=meta["storage_path"], name=f"{meta['name']}-{trial}-finetune-{level}",
                         max_failures=meta["max_failures"], loop=finetune_loop)
        if r.error is not None:
            raise r.error
        out[f"finetune_top1/{level}"] = r.return_value["metrics"][f"finetune_top1/{level}"]
    # into the cell's (closed) run through a journal: a server that is away does not fail the trial
    log = journal.Journal(meta["uri"], result.run_id, os.path.join(meta["storage_path"], f"{meta['name']}-{trial}",
                                                                   "mlflow_journal", "finetune.jsonl"))
    log.log_metrics(out, step=cfg.optim.epochs)
    log.close(10.0)
    return out


def run_sweep(cfg: Config, *, fingerprint: str, storage_path: str, finest: str, uri: str | None = None,
              max_failures: int = 0, after=None, test_levels: list[str] | None = None):
    """Run the sweep on the connected Ray cluster; returns (Tune ResultGrid, parent run id).
    after(grid, uri, parent_run_id) logs more into the parent run before it is closed; the parent
    records the trial with the best final kNN top-1 at the `finest` test level."""
    check_capacity(cfg.sweep)
    uri = uri or tracking.tracking_uri()
    name = cfg.name
    experiment = cfg.tracking.experiment or cfg.name
    parent = tracking.start_run(uri, experiment, f"sweep {name}", to_dict(cfg), tracking.provenance(fingerprint))
    ok, grid = False, None
    try:
        grid = _fit_tuner(cfg, uri, parent, fingerprint, storage_path, max_failures, test_levels or [finest])
        # the trials' own records travel through their journals; the parent's are written now,
        # so a server that went away during the sweep gets time to come back
        if not tracking.wait_for_server(uri, cfg.tracking.offline_wait_s):
            raise GrafitError(f"MLflow server {uri} did not come back within {cfg.tracking.offline_wait_s:.0f} s: "
                              f"the sweep's trials are done (their records wait in their journals, "
                              f"<storage>/trials/*/mlflow_journal: grafit sync), its parent run {parent} stays open")
        journal.replay_all(os.path.join(storage_path, "trials"), cfg.tracking.offline_wait_s)
        record_best(uri, parent, grid, f"knn_top1/{finest}")
        if after is not None:
            after(grid, uri, parent)
        ok = grid.num_errors < len(grid)
        return grid, parent
    finally:
        try:
            if grid is not None:
                close_children(uri, parent, grid)
            tracking.end_run(uri, parent, ok)
        except Exception as err:                 # the server is gone: say so, keep the first error
            print(f"grafit: could not close the sweep's MLflow runs in {uri} ({type(err).__name__}); "
                  f"they stay open", file=sys.stderr)


def max_epochs(cfg: Config) -> int:
    """The longest trial's epochs (optim.epochs may itself be swept)."""
    spec = cfg.sweep.space.get("optim.epochs")
    if not spec:
        return cfg.optim.epochs
    return int(max(next(iter(spec.values()))))


def _fit_tuner(cfg: Config, uri: str, parent: str, fingerprint: str, storage_path: str, max_failures: int,
               test_levels: list[str]):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sw, name = cfg.sweep, cfg.name
    meta = {"uri": uri, "parent_run_id": parent, "fingerprint": fingerprint, "source": cfg.source or "<config>",
            "storage_path": storage_uri(storage_path.rstrip("/") + "/trials"), "name": name,
            "max_failures": max_failures, "test_levels": test_levels}
    # one report per epoch, then the trial's final report: with max_t = epochs ASHA would stop a
    # surviving trial at its last epoch, before its evaluation and MLflow logging finish
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max_epochs(cfg) + 1,
                               grace_period=min(sw.grace_period, max_epochs(cfg)))
                 if sw.scheduler == "asha" else FIFOScheduler())
    trainable = tune.with_resources(tune.with_parameters(trial_fn, base=to_dict(cfg), meta=meta),
                                    {"CPU": 0, "memory": 1})   # the trial driver only waits on its workers
    tuner = tune.Tuner(trainable, param_space=tune_space(cfg),
                       tune_config=tune.TuneConfig(metric=sw.metric, mode=sw.mode, scheduler=scheduler,
                                                   num_samples=sw.num_samples, max_concurrent_trials=sw.max_concurrent),
                       run_config=tune.RunConfig(storage_path=storage_uri(storage_path), name=name))
    return tuner.fit()


def trial_id(path: str) -> str:
    """Tune's trial id from a trial folder name: trial_fn_<experiment>_<index>_<params>_<date>."""
    return "_".join(os.path.basename(path).split("_")[2:4])


def close_children(uri: str, parent: str, grid) -> None:
    """A trial stopped by the scheduler (or whose driver died) cannot close its own run: mark it
    KILLED (stopped early) or FAILED (errored), never leave it RUNNING."""
    failed = {trial_id(r.path) for r in grid if r.error is not None and r.path}
    c = tracking.client(uri)
    runs = c.search_runs([c.get_run(parent).info.experiment_id],
                         filter_string=f"tags.mlflow.parentRunId = '{parent}' and attributes.status = 'RUNNING'")
    for run in runs:
        trial = run.info.run_name.split("/")[-1]
        c.set_terminated(run.info.run_id, status="FAILED" if trial in failed else "KILLED")


def record_best(uri: str, parent: str, grid, final: str) -> None:
    """The best trial by final kNN top-1 at the finest test level (higher is better)."""
    rows = [r for r in grid if r.error is None and r.metrics and final in r.metrics]
    if not rows:
        return
    best = max(rows, key=lambda r: r.metrics[final])
    c = tracking.client(uri)
    c.set_tag(parent, "best.run_id", best.metrics["mlflow_run_id"])
    c.set_tag(parent, "best.config", str({k: v for k, v in best.config.items()}))
    tracking.log_metrics(uri, parent, {f"best/{k}": v for k, v in best.metrics.items()
                                       if "/" in k and isinstance(v, (int, float))})


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
