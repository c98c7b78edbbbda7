"""The one Ray Train worker loop (Ray 2.60, Train V2) and the driver side that runs it.

Every worker runs a core function unchanged, `fit` (training) or `finetune`, with its rank's
DistContext: DDP for the networks, the memory sharded by global index range, sharded evaluation.
Each epoch every rank reports the same (already reduced) metrics with its part of the checkpoint;
Ray merges the parts into one checkpoint directory. A failed worker group restarts from the
latest checkpoint (FailureConfig); rerunning with the same name resumes.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch

from grafit_core.config import Config, config_from_dict, to_dict
from grafit_core.errors import GrafitError
from orchestrator import journal, tracking
from orchestrator.job import Job, Workers, job_dict


@dataclass
class MlflowTarget:
    """The run the workers log into, through one journal per rank (orchestrator.journal)."""
    uri: str
    run_id: str
    journal_dir: str
    embeddings_max_mb: float = 256.0
    logged_epochs: int = 0                    # epochs the run already holds (a resumed run)
    flush_s: float = 20.0                     # how long a worker waits for its records at the end


@dataclass
class WorkerSpec:
    """What travels to every worker."""
    config: dict                              # grafit_core.config.to_dict
    source: str
    task: Literal["fit", "finetune"] = "fit"
    threads: int = 1
    mlflow: Optional[MlflowTarget] = None
    on_step: Optional[Callable] = None        # on_step(epoch, step_in_epoch, rank): progress, fault injection
    run_dir: Optional[str] = None             # this run name's folder of checkpoints (local storage)


def worker_loop(spec: WorkerSpec) -> dict:
    """The function every Ray Train worker runs."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from grafit_core.checkpoint import progress
    from grafit_core.data import prepare_data
    from grafit_core.distributed import DistContext
    from grafit_core.engine import fit
    from grafit_core.finetune import finetune

    cfg = config_from_dict(spec.config, spec.source)
    rctx = ray.train.get_context()
    world = rctx.get_world_size()
    torch.set_num_threads(spec.threads)
    # the memory's collectives get their own gloo group, apart from DDP's gradient all-reduce
    group = dist.new_group(backend="gloo") if world > 1 and spec.task == "fit" else None
    ctx = DistContext(rank=rctx.get_world_rank(), world_size=world, device=ray.train.torch.get_device(),
                      group=group)
    train, test = prepare_data(cfg.data, spec.source)
    resume_dir, restored = None, ray.train.get_checkpoint()
    # the newest complete checkpoint on disk may be newer than Ray Train's: one reported just before a
    # node died (not registered yet), or before the driver was killed; never an older one
    newest = latest_checkpoint(spec.run_dir, len(train)) if spec.run_dir else None
    if newest and (restored is None or os.path.basename(newest) > os.path.basename(restored.path.rstrip("/"))):
        resume_dir = tempfile.mkdtemp(prefix="grafit_resume_")
        shutil.copytree(newest, resume_dir, dirs_exist_ok=True)
    elif restored is not None:
        resume_dir = tempfile.mkdtemp(prefix="grafit_resume_")
        restored.to_directory(resume_dir)
    run = spec.mlflow
    # records go through a journal and a sender thread: a tracking server that is down delays
    # them, never a training step (the driver replays what is left)
    log_to = journal.Journal(run.uri, run.run_id, os.path.join(run.journal_dir, f"rank{ctx.rank}.jsonl")) \
        if run else None
    if run:                                      # where each rank ran: node ids as run tags
        nodes = [ray.get_runtime_context().get_node_id()] * world
        if world > 1:
            dist.all_gather_object(nodes, nodes[0])
        if ctx.is_main:                        # every (re)start of the group, at its size (elastic groups)
            epoch, batches = progress(resume_dir) if resume_dir else (0, 0)
            # one tag for the group as it is now (per-rank tags of a larger earlier group would stay behind)
            log_to.set_tags({"ray.node_ids": ",".join(nodes), "ray.world_size": world,
                             f"ray.start.epoch{epoch}.batch{batches}": f"{world} workers: {','.join(nodes)}"})
            log_to.log_metrics({"world_size": world}, step=epoch)
    # each epoch is logged once, also when this worker group restarts from an older checkpoint
    logged = max(run.logged_epochs, log_to.epochs_logged()) if run else 0

    def on_epoch(epoch, stats, save):
        if run and ctx.is_main and epoch > logged:
            log_to.log_metrics(stats, step=epoch, epoch=True)
        with tempfile.TemporaryDirectory() as tmp:
            save(tmp)
            ray.train.report(dict(stats), checkpoint=ray.train.Checkpoint.from_directory(tmp))

    notice = {"saved": False}

    def on_partial(epoch, batches, due, save):
        """Inside an epoch: a checkpoint every checkpoint.every_steps, and one as soon as a node of the
        group is about to be preempted (`ray drain-node`, a spot reclaim). The report has no "epoch":
        Tune never sees it."""
        probe = cfg.checkpoint.preemption_probe_steps
        # a barrier of every rank (~60 ms here): asked every `probe` batches, the same ones on every rank
        preempted = bool(probe) and batches % probe == 0 and ray.train.get_preemption_info() is not None
        if not due and not (preempted and not notice["saved"]):
            return
        with tempfile.TemporaryDirectory() as tmp:
            save(tmp)
            ray.train.report({"partial_epoch": epoch, "batches_done": batches},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if preempted and not notice["saved"] and run and ctx.is_main:
            log_to.set_tags({"grafit.preemption_checkpoint": f"epoch {epoch}, after {batches} batches"})
        notice["saved"] = notice["saved"] or preempted

    def on_step(epoch, step_in_epoch):
        spec.on_step(epoch, step_in_epoch, ctx.rank)

    core, epochs = (fit, cfg.optim.epochs) if spec.task == "fit" else (finetune, cfg.finetune.epochs)
    inside = {"on_partial": on_partial} if spec.task == "fit" else {}   # fine-tuning checkpoints per epoch
    try:
        result = core(cfg, train, test, ctx, on_epoch=on_epoch, log=print if ctx.is_main else (lambda s: None),
                      resume_from=resume_dir, on_step=on_step if spec.on_step else None, **inside)
        skipped = getattr(result, "skipped", None)
        if run and not skipped:
            if ctx.is_main:
                log_to.log_metrics(result.metrics, step=epochs)
                log_to.log_dict({"metrics": result.metrics, "history": result.history}, "metrics.json")
            shard = getattr(result, "embeddings", None)
            if shard is not None:
                start, stop = result.offset, result.offset + len(shard)
                part = os.path.join(run.journal_dir, "staging", f"part-{start:012d}-{stop:012d}.parquet")
                if tracking.write_embeddings(shard, result.offset, train, run.embeddings_max_mb, part):
                    log_to.log_artifact(part, "embeddings")
    finally:
        if resume_dir:
            shutil.rmtree(resume_dir, ignore_errors=True)
        if log_to is not None:
            log_to.close(run.flush_s)           # what is still unsent, the driver replays
    # Ray keeps the metrics of the last *checkpointed* report; the final metrics travel as the
    # return value of rank 0 (Result.return_value), identical on every rank anyway.
    return {"metrics": result.metrics, "history": result.history, "skipped": skipped}


def storage_uri(path: str) -> str:
    """A local folder made absolute (trial actors change directory); s3://, gs://... kept as given."""
    return path if "://" in path else os.path.abspath(path)


def latest_checkpoint(run_dir: str, rows: int | None = None) -> str | None:
    """The newest complete checkpoint Ray Train wrote under storage_path/name (local folders only);
    rows: the training set's size, when known, that every memory row be in it too."""
    from grafit_core.checkpoint import covers
    if "://" in run_dir or not os.path.isdir(run_dir):
        return None

    def complete(d):
        if os.path.exists(os.path.join(run_dir, d, "finetune_state.pt")):
            return True
        return os.path.exists(os.path.join(run_dir, d, "train_state.pt")) and (
            rows is None or covers(os.path.join(run_dir, d), rows))
    found = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_") and complete(d))
    return os.path.join(run_dir, found[-1]) if found else None


def check_checkpoint(cfg: Config, latest: str | None) -> None:
    """Rerunning a name resumes its latest checkpoint: refuse here, not in the workers, when that
    checkpoint was written by another config (errors name the keys that differ)."""
    from grafit_core.checkpoint import saved_config
    from grafit_core.config import check_resumable
    saved = saved_config(latest) if latest and os.path.exists(os.path.join(latest, "train_state.pt")) else None
    if saved is not None:
        check_resumable(saved, to_dict(cfg), latest)


def as_workers(workers) -> Workers:
    return workers if isinstance(workers, Workers) else Workers(workers, workers)


def check_resources(workers, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """A shortfall makes Ray wait forever for a placement group: refuse it up front instead (an
    elastic group needs room for its minimum)."""
    import ray
    have, n = ray.cluster_resources(), as_workers(workers).min
    need = {"CPU": n * cpus_per_worker, "GPU": n * gpus_per_worker}
    for kind, amount in need.items():
        if amount > have.get(kind, 0) + 1e-9:
            raise GrafitError(
                f"--workers {workers} needs {amount:g} {kind}s ({n} x {amount / n:g} per worker) "
                f"but the Ray cluster has {have.get(kind, 0):g}; lower --workers or "
                f"--{kind.lower()}s-per-worker, or add nodes")


def run_training(cfg: Config, *, task: str = "fit", workers, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float = 0.0, storage_path: str = "runs/ray", name: str | None = None,
                 max_failures: int = 1, mlflow: MlflowTarget | None = None, callbacks: list | None = None,
                 on_step: Callable | None = None, resize_interval_s: float = 60.0):
    """Run `task` for cfg on the connected Ray cluster with `workers` (an int or a Workers range);
    returns Ray's Result (metrics, checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    run_dir = os.path.join(storage_uri(storage_path), name or cfg.name)
    latest = latest_checkpoint(run_dir)
    if task == "fit":                         # a pre-training checkpoint's config, before any cluster resource
        check_checkpoint(cfg, latest)
    check_resources(workers, cpus_per_worker, gpus_per_worker)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    spec = WorkerSpec(to_dict(cfg), cfg.source or "<config>", task, max(1, int(cpus_per_worker)), mlflow, on_step,
                      None if "://" in run_dir else run_dir)
    trainer = TorchTrainer(
        worker_loop, train_loop_config=spec,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=as_workers(workers).scaling(), use_gpu=use_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=resize_interval_s),
        run_config=RunConfig(storage_path=storage_uri(storage_path), name=name or cfg.name,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks or []),
    )
    start = time.time()
    result = trainer.fit()
    result.wall_s = time.time() - start
    return result


def tracked_training(job: Job, *, uri: str, run_name: str, fingerprint: str, parent_run_id: str | None = None,
                     tags: dict | None = None, wait_s: float | None = None, one_run: bool = False,
                     echo: bool = False, **kwargs):
    """run_training inside an MLflow run that is always closed: FINISHED, or FAILED on any error.
    Rerunning into the same storage path and name continues its unfinished run. echo: print each
    epoch's line here, from rank 0's journal (a command's driver)."""
    cfg = job.config
    storage_key = f"{storage_uri(kwargs.get('storage_path', 'runs/ray')).rstrip('/')}/{kwargs.get('name') or cfg.name}"
    latest = latest_checkpoint(storage_key)
    # refusals come before the run and its journal folder exist: a refused command leaves nothing behind
    check_resources(kwargs["workers"], kwargs.get("cpus_per_worker", 1.0), kwargs.get("gpus_per_worker", 0.0))
    if kwargs.get("task", "fit") == "fit":
        check_checkpoint(cfg, latest)
    run_id, logged = (tracking.resumable_run(uri, job.experiment, storage_key, finished_too=one_run)
                      if latest else (None, 0))
    if run_id is None:
        run_id = tracking.start_run(uri, job.experiment, run_name, job_dict(job),
                                    {**tracking.provenance(fingerprint), **(tags or {}), "grafit.storage": storage_key},
                                    parent_run_id)
    journals = journal.local_dir(storage_key, run_id)
    ok, checkpoint_dir = False, None
    fine = kwargs.get("task") == "finetune"
    printer = journal.Echo(os.path.join(journals, "rank0.jsonl"), f"[{run_name}]",
                           cfg.finetune.epochs if fine else cfg.optim.epochs) if echo else None
    try:
        if printer:
            if latest:                        # the workers say so in their own log (--verbose)
                print(f"{printer.label} resuming from {latest}", flush=True)
            printer.start()
        target = MlflowTarget(uri, run_id, journals, job.tracking.embeddings_max_mb, logged)
        result = run_training(cfg, mlflow=target, **kwargs)
        ok = result.error is None
        if ok and job.tracking.log_checkpoint and result.checkpoint is not None:
            checkpoint_dir = result.checkpoint.path
        result.run_id = run_id
        return result
    finally:
        if printer:
            printer.stop()
        finish_run(uri, run_id, journals, ok, checkpoint_dir, job.tracking.offline_wait_s if wait_s is None else wait_s)


def finish_run(uri: str, run_id: str, journals: str, ok: bool, checkpoint_dir: str | None, wait_s: float) -> bool:
    """After training: send what the workers could not (their journals), then the checkpoint and
    the run's end through the driver's journal, all within wait_s for a server that is away. The
    end never overtakes the workers' records: while they wait, it waits in the file too."""
    start = time.time()
    workers_done = journal.replay_all(journals, wait_s, drivers=False)
    driver = journal.Journal(uri, run_id, os.path.join(journals, journal.DRIVER), send_now=workers_done)
    if checkpoint_dir:
        driver.log_artifacts(checkpoint_dir, "checkpoint")
    driver.end(ok)
    if workers_done and driver.close(max(0.0, wait_s - (time.time() - start))):
        return True
    print(f"grafit: the MLflow server {uri} did not come back within {wait_s:.0f} s: run {run_id}'s remaining "
          f"records are kept in {journals}; send them with: grafit sync {journals}", file=sys.stderr)
    return False
