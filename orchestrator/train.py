"""Distributed Grafit training on Ray Train (Ray 2.60, Train V2): `grafit train CONFIG --workers W`.

Every worker runs grafit_core's `fit` unchanged with its rank's DistContext: DDP for the
networks, the memory sharded by global index range (grafit_core.memory.ShardedMemoryBank),
sharded evaluation. Each epoch every rank reports the same metrics (already reduced) with its
part of the checkpoint (rank 0: model and optimizer; every rank: its memory rows and RNG);
Ray merges the parts into one checkpoint directory. A failed worker group restarts from the
latest checkpoint (FailureConfig); rerunning with the same name resumes.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time

import torch

from grafit_core.config import Config, config_from_dict, to_dict
from grafit_core.errors import GrafitError
from orchestrator import journal, tracking
from orchestrator.journal import Journal

# Test hook: "EPOCH:STEP:RANK:MARKER" makes that rank SIGKILL itself at that step of that epoch
# (1-based epoch), once: the marker file records that it happened (a real process death).
KILL_ENV = "GRAFIT_TEST_SIGKILL"


def _maybe_kill(spec: str | None, epoch: int, step_in_epoch: int, rank: int) -> None:
    if not spec:
        return
    e, s, r, marker = spec.split(":", 3)
    if (epoch, step_in_epoch, rank) == (int(e), int(s), int(r)) and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)


def train_loop(loop_config: dict) -> dict:
    """The function every Ray Train worker runs."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from grafit_core.data import prepare_data
    from grafit_core.distributed import DistContext
    from grafit_core.engine import fit

    cfg = config_from_dict(loop_config["config"], loop_config["source"])
    rctx = ray.train.get_context()
    world = rctx.get_world_size()
    torch.set_num_threads(loop_config["threads"])
    # the memory's collectives get their own gloo group, apart from DDP's gradient all-reduce
    group = dist.new_group(backend="gloo") if world > 1 else None
    ctx = DistContext(rank=rctx.get_world_rank(), world_size=world, device=ray.train.torch.get_device(),
                      group=group)
    train, query = prepare_data(cfg.data)

    resume_dir = None
    restored = ray.train.get_checkpoint()
    if restored is not None:
        resume_dir = tempfile.mkdtemp(prefix="grafit_resume_")
        restored.to_directory(resume_dir)

    run = loop_config.get("mlflow")             # {"uri", "run_id", "max_mb", "journal_dir", ...}
    # MLflow records go through a journal and a sender thread: a tracking server that is down
    # delays them, never a training step (the driver replays what is left, orchestrator.journal)
    mlflow_log = Journal(run["uri"], run["run_id"], os.path.join(run["journal_dir"], f"rank{ctx.rank}.jsonl")) \
        if run else None
    if run:                                      # where each rank ran: node ids as run tags
        nodes = [ray.get_runtime_context().get_node_id()] * world
        if world > 1:
            dist.all_gather_object(nodes, nodes[0])
        if ctx.is_main:
            mlflow_log.set_tags({f"ray.node_id.rank{r}": n for r, n in enumerate(nodes)})

    # each epoch is logged once, also when this worker group restarts from an older checkpoint
    logged = max(run.get("logged_epochs", 0), mlflow_log.epochs_logged()) if run else 0

    def on_epoch(epoch, stats, save):
        if run and ctx.is_main and epoch > logged:                           # rank 0 only
            mlflow_log.log_metrics(stats, step=epoch, epoch=True)
        with tempfile.TemporaryDirectory() as tmp:
            save(tmp)
            ray.train.report(dict(stats), checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def on_step(epoch, step_in_epoch):
        _maybe_kill(loop_config.get("kill"), epoch, step_in_epoch, ctx.rank)

    log = print if ctx.is_main else (lambda s: None)
    try:
        result = fit(cfg, train, query, ctx, on_epoch=on_epoch, log=log, resume_from=resume_dir, on_step=on_step)
        if run and not result.skipped:
            if ctx.is_main:
                mlflow_log.log_metrics(result.metrics, step=cfg.optim.epochs)
                mlflow_log.log_dict({"metrics": result.metrics, "history": result.history}, "metrics.json")
            start, stop = result.offset, result.offset + len(result.embeddings)
            part = os.path.join(run["journal_dir"], "staging", f"part-{start:012d}-{stop:012d}.parquet")
            if tracking.write_embeddings(result.embeddings, result.offset, train, run["max_mb"], part):
                mlflow_log.log_artifact(part, "embeddings")
    finally:
        if resume_dir:
            shutil.rmtree(resume_dir, ignore_errors=True)
        if mlflow_log is not None:
            mlflow_log.close(run.get("flush_s", 20.0))   # what is still unsent, the driver replays
    # Ray keeps the metrics of the last *checkpointed* report; the final metrics travel as the
    # return value of rank 0 (Result.return_value), identical on every rank anyway.
    return {"metrics": result.metrics, "history": result.history, "skipped": result.skipped}


def storage_uri(path: str) -> str:
    """A local folder made absolute (trial actors change directory); s3://, gs://... kept as given."""
    return path if "://" in path else os.path.abspath(path)


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest complete checkpoint Ray Train wrote under storage_path/name (local folders only)."""
    if "://" in run_dir or not os.path.isdir(run_dir):
        return None
    found = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_") and any(
        os.path.exists(os.path.join(run_dir, d, f)) for f in ("train_state.pt", "finetune_state.pt")))
    return os.path.join(run_dir, found[-1]) if found else None


def check_checkpoint(cfg: Config, storage_path: str, name: str) -> None:
    """Rerunning a name resumes its latest checkpoint: refuse here, not in the workers, when that
    checkpoint was written by another config (errors name the keys that differ)."""
    from grafit_core.checkpoint import saved_config
    from grafit_core.config import check_resumable
    latest = latest_checkpoint(os.path.join(storage_path, name))
    saved = saved_config(latest) if latest and os.path.exists(os.path.join(latest, "train_state.pt")) else None
    if saved is not None:
        check_resumable(saved, to_dict(cfg), latest)


def check_resources(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """A shortfall makes Ray wait forever for a placement group: refuse it up front instead."""
    import ray
    have = ray.cluster_resources()
    need = {"CPU": workers * cpus_per_worker, "GPU": workers * gpus_per_worker}
    for kind, amount in need.items():
        if amount > have.get(kind, 0) + 1e-9:
            raise GrafitError(
                f"--workers {workers} needs {amount:g} {kind}s ({workers} x {amount / workers:g} per worker) "
                f"but the Ray cluster has {have.get(kind, 0):g}; lower --workers or "
                f"--{kind.lower()}s-per-worker, or add nodes")


def run_training(cfg: Config, *, workers: int, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 storage_path: str = "runs/ray", name: str | None = None, max_failures: int = 1,
                 threads: int | None = None, mlflow_run: dict | None = None, callbacks: list | None = None,
                 loop=None):
    """Fit cfg on the connected Ray cluster; returns Ray's Result (metrics, checkpoint, history).
    loop: the worker function (default train_loop; orchestrator.finetune.finetune_loop)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if loop is None:                                          # a pre-training checkpoint's config
        check_checkpoint(cfg, storage_path, name or cfg.name)  # before any cluster resource is taken
    check_resources(workers, cpus_per_worker, gpus_per_worker)
    use_gpu = gpus_per_worker > 0
    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        loop or train_loop,
        train_loop_config={"config": to_dict(cfg), "source": cfg.source or "<config>",
                           "threads": threads or max(1, int(cpus_per_worker)),
                           "kill": os.environ.get(KILL_ENV), "mlflow": mlflow_run},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(storage_path=storage_uri(storage_path), name=name or cfg.name,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks or []),
    )
    start = time.time()
    result = trainer.fit()
    result.wall_s = time.time() - start
    return result


def tracked_training(cfg: Config, *, uri: str, run_name: str, fingerprint: str, parent_run_id: str | None = None,
                     wait_s: float | None = None, **kwargs):
    """run_training inside an MLflow run that is always closed: FINISHED, or FAILED on any error.
    Rerunning into the same storage path and name continues its unfinished run."""
    experiment = cfg.tracking.experiment or cfg.name
    storage = storage_uri(kwargs.get("storage_path", "runs/ray")).rstrip("/")
    storage_key = f"{storage}/{kwargs.get('name') or cfg.name}"
    run_id, logged = (tracking.resumable_run(uri, experiment, storage_key) if latest_checkpoint(storage_key)
                      else (None, 0))
    if run_id is None:
        run_id = tracking.start_run(uri, experiment, run_name, to_dict(cfg),
                                    {**tracking.provenance(fingerprint), "grafit.storage": storage_key}, parent_run_id)
    journals = (os.path.join(storage_key, "mlflow_journal") if "://" not in storage_key else
                os.path.join(tempfile.gettempdir(), "grafit-journal", run_id))
    ok, checkpoint_dir = False, None
    try:
        result = run_training(cfg, mlflow_run={"uri": uri, "run_id": run_id, "max_mb": cfg.tracking.embeddings_max_mb,
                                               "logged_epochs": logged, "journal_dir": journals}, **kwargs)
        ok = result.error is None
        if ok and cfg.tracking.log_checkpoint and result.checkpoint is not None:
            checkpoint_dir = result.checkpoint.path
        result.run_id = run_id
        return result
    finally:
        finish_run(uri, run_id, journals, ok, checkpoint_dir, cfg.tracking.offline_wait_s if wait_s is None else wait_s)


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
