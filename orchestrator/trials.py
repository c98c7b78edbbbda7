"""One Tune trial of a sweep or matrix: a driver that trains one configuration on Ray Train workers.

A trial is named by a hash of its configuration (seed included), never by Tune's trial id: its
checkpoint folder `<storage>/trials/<sweep>-<key>` and its MLflow run (tag `grafit.trial_key`)
are found again when the sweep is rerun. A trial that finished replays its stored reports to Tune
instead of training; one that was interrupted replays the epochs of its latest checkpoint (so that
ASHA sees the same rungs), then continues from that checkpoint into the same MLflow run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

from grafit_core.config import flat_config, to_dict, with_overrides
from grafit_core.data import NONE_LEVEL
from grafit_core.methods import get_method
from orchestrator import journal
from orchestrator.job import Job, job_from_dict, job_with, objective_metric
from orchestrator.workers import latest_checkpoint, run_training, tracked_training

RESULT = "trial.json"                         # the reports of a finished trial, in order
KEY_CHARS = 12                                # a trial key's hex digits
# what a rerun may change and still continue a sweep (and a trial keep its key): where and how
# wide it runs, where its data lives, how long it waits for MLflow; never what is trained or where it is tracked
RESUMABLE_CHANGES = ("name", "checkpoint.", "tracking.embeddings_max_mb", "tracking.log_checkpoint",
                     "tracking.offline_wait_s", "sweep.max_concurrent", "sweep.workers", "sweep.cpus_per_worker",
                     "sweep.gpus_per_worker", "data.root", "data.num_workers", "data.options.cache_size",
                     "data.check_sample")


def resumable_fields(data: dict) -> dict:
    """The flattened job or config without what a rerun may change."""
    return {k: v for k, v in flat_config(data).items()
            if not any(k == c or (c.endswith(".") and k.startswith(c)) for c in RESUMABLE_CHANGES)}


@dataclass
class TrialSpec:
    """What every trial driver needs besides its sampled parameters."""
    job: dict                                 # orchestrator.job.job_dict
    source: str
    uri: str
    parent_run_id: str
    fingerprint: str                          # of the dataset
    storage_path: str                         # absolute: <storage>/trials
    name: str
    max_failures: int
    test_levels: list[str]
    on_step: Optional[Callable] = None        # passed to the workers (fault injection)


def trial_key(job: Job) -> str:
    """The trial's identity: a hash of what it trains and evaluates (the core's config, seed included;
    not where its data lives or how many loader processes read it)."""
    blob = json.dumps(resumable_fields(to_dict(job.config)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_CHARS]


def trial_dir(spec: TrialSpec, key: str) -> str:
    return os.path.join(spec.storage_path, f"{spec.name}-{key}")


def stored_reports(folder: str) -> list[dict] | None:
    """The reports of a finished trial (None if it did not finish)."""
    path = os.path.join(folder, RESULT)
    return json.load(open(path))["reports"] if os.path.exists(path) else None


def store_reports(folder: str, reports: list[dict]) -> None:
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{RESULT}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"reports": reports}, f)
    os.replace(tmp, os.path.join(folder, RESULT))   # atomic: a killed driver leaves none or all


def epochs_done(folder: str) -> list[dict]:
    """The per-epoch reports already in the trial's latest checkpoint (an interrupted trial)."""
    import torch
    latest = latest_checkpoint(folder)
    if latest is None or not os.path.exists(os.path.join(latest, "train_state.pt")):
        return []
    return torch.load(os.path.join(latest, "train_state.pt"), map_location="cpu", weights_only=True)["history"]


def trial_fn(params: dict, spec: TrialSpec) -> None:
    """One Tune trial: replay what is stored, train what is not, report the final metrics."""
    from ray import tune

    objective = objective_metric(spec.test_levels)

    def report(metrics: dict) -> None:
        # every report carries the sweep's objective, NaN until the final report: Tune refuses a
        # result without its searcher's metric (sweep.search: tpe), and TPE reads only the final one
        tune.report({objective: math.nan, **metrics})

    job = job_with(job_from_dict(spec.job, spec.source), params)
    cfg, sw, key = job.config, job.sweep, trial_key(job)
    folder = trial_dir(spec, key)
    done = stored_reports(folder)
    if done is not None:                        # finished before the sweep was interrupted
        for stored in done:
            report(stored)
        return
    if cfg.data.train_level == NONE_LEVEL and not get_method(cfg.method.name).label_free(cfg):
        # nothing to learn without labels: no workers, no run, a blank cell (the scheduler's
        # metric must still be present in the report)
        final = {sw.metric: float("nan"), "trained": 0, "skipped": 1, "trial_key": key}
        store_reports(folder, [final])
        report(final)
        return
    for epoch in epochs_done(folder):           # ASHA sees the epochs trained before the interruption
        report(epoch)
    result = tracked_training(
        job, uri=spec.uri, run_name=f"{spec.name}/{run_label(params)}", fingerprint=spec.fingerprint,
        parent_run_id=spec.parent_run_id, tags={"grafit.trial_key": key}, workers=sw.worker_range,
        cpus_per_worker=sw.cpus_per_worker, gpus_per_worker=sw.gpus_per_worker, storage_path=spec.storage_path,
        name=f"{spec.name}-{key}", max_failures=spec.max_failures, resize_interval_s=sw.resize_interval_s,
        callbacks=[objective_reporter(objective)],
        on_step=spec.on_step, one_run=True,
        wait_s=10.0)                            # a server that is away: the sweep's end replays, not each trial
    if result.error is not None:
        raise result.error                      # Tune marks the trial failed; the sweep goes on
    final = result.return_value
    if job.matrix.finetune and not final["skipped"]:
        final["metrics"].update(finetune_cells(job, result, spec, key))
    # the final report comes after the last epoch's: its epoch is ASHA's max_t, so a surviving
    # trial is never stopped before its evaluation and MLflow logging are done
    last = {**(final["history"][-1] if final["history"] else {}), **({} if final["skipped"] else final["metrics"]),
            "epoch": max_epochs(job) + 1, "mlflow_run_id": result.run_id, "trained": 0 if final["skipped"] else 1,
            "trial_key": key, "checkpoint_dir": result.checkpoint.path if result.checkpoint else ""}
    store_reports(folder, [*final["history"], last])
    report(last)


def objective_reporter(objective: str):
    """Ray Train's TuneReportCallback (rank 0's per-epoch metrics to Tune), each report carrying the
    sweep's objective as NaN (the per-epoch metrics have only its online estimate)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class WithObjective(TuneReportCallback):   # sent to Train's controller by cloudpickle, local class included
        def after_report(self, run_context, metrics, checkpoint):
            if "epoch" in metrics[0]:             # not a checkpoint inside an epoch (checkpoint.every_steps)
                super().after_report(run_context, [{objective: math.nan, **metrics[0]}, *metrics[1:]], checkpoint)

    return WithObjective()


def trial_progress(epochs: int, objective: str, quiet: bool = True):
    """A Tune callback (run by the driver) that knows which trials ended (completed, stopped by the
    scheduler or errored): a trial Tune was still running when it was interrupted (Ctrl-C, SIGUSR1)
    never ends, and Tune returns from fit() as if the sweep were done. When quiet (no --verbose) it
    prints one line per trial epoch, one per trial's end, and the trials' states when they change:
    Tune's own tables and the workers' logs are behind --verbose."""
    from collections import Counter

    from ray.tune import Callback

    def states(trials, trial, now: str) -> None:
        """The trials' states once `trial` is in state `now` (Tune updates it after the callback)."""
        if quiet:
            counts = Counter(now if t is trial else t.status.lower() for t in trials)
            print("== trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + " ==", flush=True)

    class Progress(Callback):             # Tune calls it in the driver process
        def __init__(self):
            self.started, self.ended, self.configs = set(), set(), {}

        def unfinished(self, expected: int) -> int:
            """How many of the sweep's `expected` trials did not end (0: the sweep is complete)."""
            return max(expected - len(self.ended), len(self.started - self.ended))

        def cut_short(self) -> list[dict]:
            """The configurations of the trials that started and never ended (an interrupted sweep)."""
            return [self.configs[t] for t in sorted(self.started - self.ended)]

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started.add(trial.trial_id)
            self.configs[trial.trial_id] = trial.config
            states(trials, trial, "running")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            label = f"[{run_label(trial.config)}]"
            if not quiet:
                return
            if result.get("skipped"):
                print(f"{label} skipped: nothing to learn at this level", flush=True)
            elif "trained" in result:
                print(f"{label} done: {objective} {100 * result.get(objective, math.nan):.1f}", flush=True)
            elif "epoch" in result:
                shown = ", ".join(f"{k}={v:.4g}" for k, v in result.items()
                                  if k in SHOWN or k.startswith("online_knn_top1/"))
                print(f"{label} epoch {result['epoch']}/{epochs}: {shown}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended.add(trial.trial_id)
            states(trials, trial, "terminated")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.ended.add(trial.trial_id)
            if quiet:
                print(f"[{run_label(trial.config)}] FAILED (its error: {trial.local_path or '-'})", flush=True)
            states(trials, trial, "error")

    return Progress()


SHOWN = ("loss", "knn", "inst", "ce", "epoch_time_s")   # of an epoch's report, with online_knn_top1/<level>


def run_label(params: dict) -> str:
    """A run name a reader can place: the sampled values, e.g. sigma=0.05,seed=1."""
    return ",".join(f"{k.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                    for k, v in sorted(params.items()))


def max_epochs(job: Job) -> int:
    """The longest trial's epochs (optim.epochs may itself be swept)."""
    spec = job.sweep.space.get("optim.epochs")
    return int(max(next(iter(spec.values())))) if spec else job.config.optim.epochs


def finetune_cells(job: Job, result, spec: TrialSpec, key: str) -> dict:
    """A matrix cell's fine-tuning column: its trunk fine-tuned at every test level (one Ray
    Train fit each), logged into the cell's run next to kNN and mAP."""
    out, sw = {}, job.sweep
    for level in spec.test_levels:
        ft = with_overrides(job.config, {"finetune.checkpoint": result.checkpoint.path, "finetune.level": level})
        r = run_training(ft, task="finetune", workers=sw.worker_range, cpus_per_worker=sw.cpus_per_worker,
                         gpus_per_worker=sw.gpus_per_worker, storage_path=spec.storage_path,
                         name=f"{spec.name}-{key}-finetune-{level}", max_failures=spec.max_failures,
                         resize_interval_s=sw.resize_interval_s)
        if r.error is not None:
            raise r.error
        out[f"finetune_top1/{level}"] = r.return_value["metrics"][f"finetune_top1/{level}"]
    # into the cell's (closed) run through a journal: a server that is away does not fail the trial
    log = journal.Journal(spec.uri, result.run_id, os.path.join(trial_dir(spec, key), "mlflow_journal",
                                                                "finetune.jsonl"))
    log.log_metrics(out, step=job.config.optim.epochs)
    log.close(10.0)
    return out
