"""Sweeps: `grafit sweep jobs/sweeps/X.yaml` (Ray Tune over Train V2, tracked in MLflow).

Ray 2.60 wants a Tuner over a *driver function* that builds one TorchTrainer per trial and
forwards rank 0's per-epoch reports to Tune (TuneReportCallback); `Tuner(TorchTrainer)` fails.
Tune samples only training parameters (sweep.space); evaluation-only values (sweep.eval_grid:
k, voting sigma) are all evaluated inside each trial from its one set of embeddings.
MLflow: one parent run per sweep, one nested child run per trial, an aggregate run per configuration
with replicates, the best configuration (highest mean final kNN top-1 at the finest level over its
replicates) on the parent; everything the driver writes goes through the parent's journal. A rerun
continues the sweep (orchestrator.trials).
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from grafit_core.errors import ConfigError, GrafitError
from orchestrator import figures, journal, tracking
from orchestrator.job import Job, job_dict, job_with, objective_metric
from orchestrator.prepare import Prepared, format_table, launch, markdown_table, max_failures, prepare
from orchestrator.searchers import expected_trials, num_trials, search_algorithm, tune_space
from orchestrator.trials import (KEY_CHARS, TrialSpec, max_epochs, resumable_fields, run_label, stored_reports,
                                 trial_dir, trial_fn, trial_key, trial_progress)
from orchestrator.workers import storage_uri



def state_dir(job: Job, storage_path: str) -> str:
    """The sweep's own files (its definition, the parent run's journal, matrices): not Tune's."""
    return os.path.join(storage_uri(storage_path), "sweeps", job.config.name)


def check_definition(job: Job, storage_path: str, fingerprint: str | None = None) -> None:
    """A rerun continues the sweep stored under the same name: refuse it (naming the keys) when the
    definition changed (space, eval grid, budget, anything trained) or, given its fingerprint, the
    dataset did (data.root may move, not change its files), before any resource is taken."""
    if "://" in storage_path:                 # trial results, definitions and journals are local files
        raise ConfigError(f"{job.source}: --storage-path (or GRAFIT_STORAGE) {storage_path}: a sweep or matrix keeps "
                          f"what makes it resumable in files: give a folder every node reaches (NFS), not a URI")
    name, storage = job.config.name, storage_uri(storage_path)
    if name in ("trials", "sweeps") or glob.glob(os.path.join(storage, glob.escape(name), "checkpoint_*")):
        # Tune's folder <storage>/<name> is emptied at every start: never the trials, the sweeps' own
        # files, or a training run's checkpoints
        raise ConfigError(f"{job.source}: name: {name!r} is taken in {storage_path} (the trials' or sweeps' folder, "
                          f"or a training run's checkpoints); give the sweep another name")
    dataset = os.path.join(state_dir(job, storage_path), "dataset.json")
    if fingerprint and os.path.exists(dataset) and json.load(open(dataset)) != fingerprint:
        raise ConfigError(f"{job.source}: the sweep {name!r} in {storage_path} was started on another dataset "
                          f"(fingerprint {json.load(open(dataset))}, now {fingerprint}: data.root's files differ); "
                          f"its trials would mix the two: use another name or storage path")
    path = os.path.join(state_dir(job, storage_path), "definition.json")
    if not os.path.exists(path):
        return
    saved, now = resumable_fields(json.load(open(path))), resumable_fields(job_dict(job))
    diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if diff:
        shown = "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in diff[:5])
        raise ConfigError(f"{job.source}: the sweep {job.config.name!r} in {storage_path} was started with another "
                          f"definition ({shown}{'; ...' if len(diff) > 5 else ''}); use another name or storage path")


def save_state(job: Job, storage_path: str, name: str, data) -> None:
    """One of the sweep's own files (definition.json, parent_run), atomically."""
    folder = state_dir(job, storage_path)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.tmp"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(os.path.join(folder, f"{name}.tmp"), os.path.join(folder, name))


def parent_run(job: Job, uri: str, storage_path: str, fingerprint: str, kind: str = "sweep") -> str:
    """The sweep's parent run: the one this sweep's earlier (interrupted) driver opened, reopened;
    else a new one (a sweep whose folder sweeps/<name> was deleted gets a new parent, but its trials
    under trials/ are still replayed or continued, in their own runs: delete those too to start afresh)."""
    saved = os.path.join(state_dir(job, storage_path), "parent_run")
    if os.path.exists(saved):
        run_id = json.load(open(saved))
        tracking.client(uri).update_run(run_id, status="RUNNING")
        return run_id
    run_id = tracking.start_run(uri, job.experiment, f"{kind} {job.config.name}", job_dict(job),
                                {**tracking.provenance(fingerprint), "grafit.sweep": state_dir(job, storage_path)})
    save_state(job, storage_path, "parent_run", run_id)
    return run_id


def run_sweep(prep: Prepared, *, storage_path: str, max_failures: int = 0, after=None,
              on_step: Callable | None = None):
    """Run (or continue) the sweep on the connected Ray cluster; returns (Tune ResultGrid, parent
    run id). after(grid, parent_journal) logs more into the parent run before it is closed; the
    parent records the best configuration (record_best)."""
    job, uri = prep.job, tracking.tracking_uri()
    check_capacity(job.sweep)
    if not os.path.exists(os.path.join(state_dir(job, storage_path), "definition.json")):
        save_state(job, storage_path, "definition.json", job_dict(job))
    if not os.path.exists(os.path.join(state_dir(job, storage_path), "dataset.json")):
        save_state(job, storage_path, "dataset.json", prep.fingerprint)
    parent = parent_run(job, uri, storage_path, prep.fingerprint, prep.kind)
    log = journal.Journal(uri, parent, os.path.join(state_dir(job, storage_path), "mlflow_journal", "parent.jsonl"))
    ok, grid, wait_s = False, None, job.tracking.offline_wait_s
    spec = TrialSpec(job_dict(job), job.source, uri, parent, prep.fingerprint,
                     storage_uri(storage_path.rstrip("/") + "/trials"), job.config.name, max_failures,
                     prep.levels, on_step)
    verbose = getattr(prep.args, "verbose", False)
    progress = trial_progress(max_epochs(job), objective_metric(prep.levels), quiet=not verbose)
    try:
        grid = _fit_tuner(job, spec, storage_path, progress, verbose)
        missing = progress.unfinished(expected_trials(job))
        if missing:                            # Tune returns from an interrupted fit() as if it were done
            raise Interrupted(f"{prep.kind} {job.config.name} interrupted: {missing} of {expected_trials(job)} "
                              f"trials unfinished; nothing is lost: rerun the same command to continue it")
        # the trials' own records travel through their journals; the parent's are read and
        # written now, so a server that went away during the sweep gets time to come back
        if not tracking.wait_for_server(uri, wait_s):
            raise GrafitError(f"MLflow server {uri} did not come back within {wait_s:.0f} s: "
                              f"the sweep's trials are done (their records wait in their journals, "
                              f"<storage>/trials/*/mlflow_journal: grafit sync), its parent run {parent} stays open")
        replay_trials(spec, wait_s)
        keep_finished(grid, job, spec)
        confs, objective = configurations(grid), objective_metric(prep.levels)
        record_best(log, job, confs, objective)
        describe(log, job, confs, objective, summary_keys(prep.levels))
        if after is not None:
            after(grid, log)
        ok = grid.num_errors < len(grid)
        return grid, parent
    finally:
        # Ctrl-C: Tune returned early (Interrupted), or a second one broke out of Tune itself
        interrupted = isinstance(sys.exc_info()[1], (Interrupted, KeyboardInterrupt))
        try:
            if interrupted:                    # what the finished trials' drivers left, before closing the rest
                replay_trials(spec, min(wait_s, 10.0))
            close_children(log, job, grid or [], progress.cut_short())
            log.end("KILLED" if interrupted else ok)
        except Exception as err:                 # the server is gone: say so, keep the first error
            print(f"grafit: could not close the sweep's MLflow runs in {uri} ({type(err).__name__}); "
                  f"they stay open", file=sys.stderr)
        if not log.close(wait_s):
            print(f"grafit: the sweep's parent run {parent} records wait in {log.path}: grafit sync "
                  f"{os.path.dirname(log.path)}", file=sys.stderr)


def replay_trials(spec: TrialSpec, wait_s: float) -> None:
    """Send what this sweep's trial drivers left in their journals (not other sweeps': `<name>-<key>`)."""
    deadline = time.time() + wait_s
    for folder in glob.glob(os.path.join(spec.storage_path, f"{glob.escape(spec.name)}-{'?' * KEY_CHARS}",
                                         "mlflow_journal")):
        journal.replay_all(folder, max(0.0, deadline - time.time()))


def keep_finished(grid, job: Job, spec: TrialSpec) -> None:
    """A finished trial that ASHA stopped while it replayed its stored reports (trials running at once
    fill the rungs in another order than the first time) keeps its stored final report."""
    for r in grid:
        if r.error is None and r.metrics is not None and "trained" not in r.metrics:
            stored = stored_reports(trial_dir(spec, trial_key(job_with(job, r.config))))
            if stored:
                r.metrics = stored[-1]


class Interrupted(GrafitError):
    """The sweep stopped before every trial ended (Ctrl-C): no best, no table that looks final."""


def check_capacity(sw) -> None:
    import ray
    cpus = ray.cluster_resources().get("CPU", 0)
    need = sw.max_concurrent * sw.worker_range.min * sw.cpus_per_worker     # an elastic trial needs its minimum
    if need > cpus + 1e-9:
        raise GrafitError(f"sweep.max_concurrent x sweep.workers x sweep.cpus_per_worker = {need:g} CPUs but "
                          f"the Ray cluster has {cpus:g}: concurrent trials would wait forever")


def _fit_tuner(job: Job, spec: TrialSpec, storage_path: str, progress, verbose: bool = False):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sw = job.sweep
    # the epoch, not Tune's iteration count, is ASHA's clock: a resumed trial replays its epochs,
    # so its rungs are the same as before the interruption; the final report comes at max_t
    scheduler = (ASHAScheduler(metric=sw.metric, mode=sw.mode, time_attr="epoch", max_t=max_epochs(job) + 1,
                               grace_period=min(sw.grace_period, max_epochs(job)))
                 if sw.scheduler == "asha" else FIFOScheduler())
    tune_dir = os.path.join(storage_uri(storage_path), job.config.name)
    if "://" not in tune_dir and os.path.isdir(tune_dir):
        shutil.rmtree(tune_dir)                # Tune's state of an earlier driver: the trial keys resume, not it
    # the trial driver only waits on its workers (no CPU); it sits on the head node, which outlives the
    # worker nodes an elastic trial may lose (node:__internal_head__: the resource only the head has)
    trainable = tune.with_resources(tune.with_parameters(trial_fn, spec=spec),
                                    {"CPU": 0, "memory": 1, "node:__internal_head__": 0.001})
    # TPE is told the objective at each trial's end (the mean over its replicates); ASHA reads sw.metric per epoch
    limit = sw.max_concurrent if sw.search == "tpe" else None   # random: the seeded generator limits itself
    if not verbose:                           # Tune's reporter of old prints nothing at verbose 0; the new one
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"    # still prints its heading: trial_progress prints instead
    tuner = tune.Tuner(trainable, param_space=tune_space(job),
                       tune_config=tune.TuneConfig(scheduler=scheduler,
                                                   search_alg=search_algorithm(job, objective_metric(spec.test_levels)),
                                                   num_samples=num_trials(job), max_concurrent_trials=limit),
                       run_config=tune.RunConfig(storage_path=storage_uri(storage_path), name=job.config.name,
                                                 callbacks=[progress], **({} if verbose else {"verbose": 0})))
    return tuner.fit()


def close_children(log: journal.Journal, job: Job, grid, cut_short: list[dict] = ()) -> None:
    """No trial's run is left RUNNING: one that errored is FAILED; one stopped by the scheduler or cut
    short by an interruption (Ctrl-C) is KILLED, also when its dying driver closed it FAILED first (the
    newest run of its key only: an older attempt that really failed stays FAILED)."""
    stopped = {trial_key(job_with(job, r.config)) for r in grid
               if r.error is None and r.metrics and "trained" not in r.metrics}
    stopped |= {trial_key(job_with(job, params)) for params in cut_short}
    failed = {trial_key(job_with(job, r.config)) for r in grid if r.error is not None} - stopped
    c = tracking.client(log.uri)
    runs = c.search_runs([c.get_run(log.run_id).info.experiment_id], order_by=["attribute.start_time"],
                         filter_string=f"tags.mlflow.parentRunId = '{log.run_id}' and attributes.status != 'FINISHED'")
    newest = {run.data.tags["grafit.trial_key"]: run.info.run_id for run in runs if "grafit.trial_key" in run.data.tags}
    for run in runs:                          # trials only: an aggregate's end may still be in the journal
        key, status = run.data.tags.get("grafit.trial_key"), run.info.status
        if key is not None and (status == "RUNNING" or (status == "FAILED" and key in stopped
                                                         and newest[key] == run.info.run_id)):
            log.end("FAILED" if key in failed else "KILLED", run_id=run.info.run_id)


REPLICATE_KEYS = ("seed",)                   # what replicates of one configuration differ in


@dataclass
class Configuration:
    """The finished replicates of one configuration (trials that differ only in their seed)."""
    params: dict                              # the sampled values, seed excluded
    trials: list                              # Tune results
    mean: dict = field(default_factory=dict)  # every numeric final metric: mean over replicates
    std: dict = field(default_factory=dict)   # sample standard deviation (0 for one replicate)


def configurations(grid) -> list[Configuration]:
    groups: dict[str, Configuration] = {}
    seen = set()                              # a trial drawn twice (repeated choices) counts once
    for r in grid:
        if r.error is None and r.metrics and r.metrics.get("trained") and r.metrics["trial_key"] not in seen:
            seen.add(r.metrics["trial_key"])
            params = {k: v for k, v in r.config.items() if k not in REPLICATE_KEYS}
            key = json.dumps(params, sort_keys=True, default=str)
            groups.setdefault(key, Configuration(params, [])).trials.append(r)
    for conf in groups.values():
        keys = {k for r in conf.trials for k, v in r.metrics.items() if "/" in k and isinstance(v, (int, float))}
        for k in sorted(keys):
            vals = [r.metrics[k] for r in conf.trials if not math.isnan(r.metrics.get(k, math.nan))]
            if vals:
                conf.mean[k] = statistics.mean(vals)
                conf.std[k] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return list(groups.values())


def best_configuration(confs: list[Configuration], objective: str) -> Configuration | None:
    """The sweep's one definition of best: the highest mean over replicates of the final objective."""
    scored = [c for c in confs if objective in c.mean]
    return max(scored, key=lambda c: c.mean[objective]) if scored else None


def has_replicates(job: Job) -> bool:
    return "seed" in job.sweep.space or job.sweep.seeds > 1


def log_aggregates(log: journal.Journal, job: Job, confs: list[Configuration]) -> dict[int, str]:
    """One aggregate run per configuration, nested under the parent (tag grafit.kind = aggregate):
    params = the configuration without the seed, `seeds`, each final metric's mean under its own
    name and `<metric>/std`. A rerun updates the same runs. Returns {id(configuration): run id}."""
    c = tracking.client(log.uri)
    experiment = c.get_run(log.run_id).info.experiment_id
    out = {}
    for conf in confs:
        key = hashlib.sha256(json.dumps(conf.params, sort_keys=True, default=str).encode()).hexdigest()[:12]
        found = c.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{log.run_id}' and "
                                                          f"tags.`grafit.aggregate_key` = '{key}'")
        params = job_dict(job_with(job, conf.params))
        params.pop("seed")
        run_id = found[0].info.run_id if found else tracking.start_run(
            log.uri, job.experiment, f"{job.config.name}/mean {run_label(conf.params)}", params,
            {"grafit.kind": "aggregate", "grafit.aggregate_key": key}, log.run_id)
        log.log_metrics({"seeds": len(conf.trials), **conf.mean, **{f"{k}/std": v for k, v in conf.std.items()}},
                        step=0, run_id=run_id)
        log.end(True, run_id=run_id)
        out[id(conf)] = run_id
    return out


def record_best(log: journal.Journal, job: Job, confs: list[Configuration], objective: str) -> None:
    """best.run_id: the aggregate run of the best configuration (with replicates), else its trial's run."""
    aggregate = log_aggregates(log, job, confs) if has_replicates(job) else {}
    best = best_configuration(confs, objective)
    if best is None:
        return
    log.set_tags({"best.run_id": aggregate.get(id(best), best.trials[0].metrics["mlflow_run_id"]),
                  "best.config": str(best.params), "best.objective": f"{objective} (mean over replicates)"})
    log.log_metrics({f"best/{k}": v for k, v in best.mean.items()}, step=0)


def trial_table(job: Job, grid, params: list[str], keys: list[str]) -> list[dict]:
    """One row per trial: its swept values, status and final metrics."""
    rows = []
    for r in grid:
        trial = trial_key(job_with(job, r.config))
        stopped = r.metrics and "trained" not in r.metrics
        status = "FAILED" if r.error else ("stopped" if stopped else
                                           "skipped" if (r.metrics or {}).get("skipped") else "ok")
        row = {"trial": trial, "status": status}
        row.update({p: str(r.config.get(p)) for p in params})
        row.update({k: (r.metrics or {}).get(k, "-") for k in keys})
        rows.append(row)
    return rows


NOTE_LIMIT = 8000                             # characters MLflow keeps in a run's description


def summary_keys(levels: list[str]) -> list[str]:
    return [f"{m}/{lv}" for lv in levels for m in ("knn_top1", "map_cosine", "map_cond")]


def describe(log: journal.Journal, job: Job, confs: list[Configuration], objective: str, keys: list[str]) -> None:
    """The parent run shows the sweep: its description is the configurations' table (mean ± std over
    replicates, best first), the full table an artifact, one figure per swept parameter."""
    confs = sorted(confs, key=lambda c: -c.mean.get(objective, -math.inf))
    params = [p for p in job.sweep.space if p not in REPLICATE_KEYS]
    table = markdown_table(configuration_table(confs, keys), [*params, "seeds", *keys])
    note = f"**{job.config.name}**: {len(confs)} configurations, best first by the mean {objective} (%).\n\n{table}"
    if len(note) > NOTE_LIMIT:
        note = note[:NOTE_LIMIT - 80].rsplit("\n", 1)[0] + "\n\n(cut: the full table is sweep/configurations.md)"
    log.set_tags({"mlflow.note.content": note})
    figures.log_item(log, table + "\n", "configurations.md", folder="sweep")
    for param in params:                      # marginal over the other parameters, all replicates pooled
        by_value: dict[str, list[float]] = {}
        for c in confs:
            by_value.setdefault(str(c.params.get(param)), []).extend(
                r.metrics[objective] for r in c.trials if not math.isnan(r.metrics.get(objective, math.nan)))
        values = sorted((v for v in by_value if by_value[v]), key=_sortable)
        if values:
            stats = [(statistics.mean(by_value[v]), statistics.stdev(by_value[v]) if len(by_value[v]) > 1 else 0.0)
                     for v in values]
            figures.log_item(log, figures.param_effect(values, [m for m, _ in stats], [s for _, s in stats], param,
                                                       objective), f"param_{param}.png")


def _sortable(value: str):
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def configuration_table(confs: list[Configuration], keys: list[str]) -> list[dict]:
    """One row per configuration: its values, its replicates, mean ± std of each metric (%)."""
    return [{**{k: str(v) for k, v in c.params.items()}, "seeds": len(c.trials),
             **{k: f"{100 * c.mean[k]:.1f} ± {100 * c.std[k]:.1f}" for k in keys if k in c.mean}} for c in confs]


def cmd_sweep(args) -> int:
    """Validate the sweep against its data, run it on Ray Tune, print the trials."""
    prep = prepare("sweep", args)
    check_definition(prep.job, args.storage_path, prep.fingerprint)
    if not launch(prep):
        return 0
    grid, parent = run_sweep(prep, storage_path=args.storage_path,
                             max_failures=max_failures(args, prep.job.sweep.worker_range))
    params = list(prep.job.sweep.space)
    keys = summary_keys(prep.levels)
    rows = trial_table(prep.job, grid, params, keys)
    print(f"\n== sweep {prep.job.config.name}: {len(rows)} trials, {grid.num_errors} failed ==")
    print(format_table(rows, ["trial", "status", *params, *keys]))
    confs, objective = configurations(grid), objective_metric(prep.levels)
    if has_replicates(prep.job):
        print("\n== mean ± std over seeds ==")
        print(format_table(configuration_table(confs, keys), [p for p in params if p != "seed"] + ["seeds", *keys]))
    best = best_configuration(confs, objective)
    if best is not None:
        print(f"\nbest (highest mean {objective} over {len(best.trials)} replicate(s)): {best.params}: "
              f"{100 * best.mean[objective]:.1f} ± {100 * best.std[objective]:.1f}")
    print("\n" + tracking.where(tracking.tracking_uri(), parent, "parent run", experiment=True))
    return 0 if grid.num_errors < len(rows) else 1
