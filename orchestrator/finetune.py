"""`grafit finetune JOB.yaml --workers W`: fine-tuning (paper §4.6) through the same Ray Train path
as training: W workers (DDP), a checkpoint every epoch (rerunning the same name resumes), an
MLflow run (per-epoch loss and top-1/top-5 from rank 0 through the journal, final metrics).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile

import torch

from grafit_core.config import config_from_dict
from grafit_core.errors import GrafitError
from orchestrator.journal import Journal


def finetune_loop(loop_config: dict) -> dict:
    """The function every Ray Train worker runs for a fine-tuning job."""
    import ray.train
    import ray.train.torch

    from grafit_core.data import prepare_data
    from grafit_core.distributed import DistContext
    from grafit_core.finetune import finetune

    cfg = config_from_dict(loop_config["config"], loop_config["source"])
    rctx = ray.train.get_context()
    torch.set_num_threads(loop_config["threads"])
    ctx = DistContext(rank=rctx.get_world_rank(), world_size=rctx.get_world_size(),
                      device=ray.train.torch.get_device())
    train, test = prepare_data(cfg.data)
    resume_dir = None
    if ray.train.get_checkpoint() is not None:
        resume_dir = tempfile.mkdtemp(prefix="grafit_ft_resume_")
        ray.train.get_checkpoint().to_directory(resume_dir)
    run = loop_config.get("mlflow")
    log_to = Journal(run["uri"], run["run_id"], os.path.join(run["journal_dir"], f"rank{ctx.rank}.jsonl")) \
        if run and ctx.is_main else None
    logged = max(run.get("logged_epochs", 0), log_to.epochs_logged()) if log_to else 0

    def on_epoch(epoch, stats, save):
        if log_to is not None and epoch > logged:
            log_to.log_metrics(stats, step=epoch, epoch=True)
        with tempfile.TemporaryDirectory() as tmp:
            save(tmp)
            ray.train.report(dict(stats), checkpoint=ray.train.Checkpoint.from_directory(tmp))

    try:
        result = finetune(cfg, train, test, ctx, on_epoch=on_epoch, log=print if ctx.is_main else (lambda s: None),
                          resume_from=resume_dir)
        if log_to is not None:
            log_to.log_metrics(result.metrics, step=cfg.finetune.epochs)
            log_to.log_dict({"metrics": result.metrics, "history": result.history}, "metrics.json")
    finally:
        if resume_dir:
            shutil.rmtree(resume_dir, ignore_errors=True)
        if log_to is not None:
            log_to.close(run.get("flush_s", 20.0))
    return {"metrics": result.metrics, "history": result.history, "skipped": None}


def cmd_finetune(args) -> int:
    """Validate locally, then fine-tune on Ray with W workers, tracked in MLflow."""
    from grafit_core.config import load_config
    from grafit_core.data import prepare_data
    from grafit_core.finetune import check_finetune
    from orchestrator import tracking
    from orchestrator.cli import connect_ray, parse_set
    from orchestrator.train import tracked_training

    cfg = load_config(args.config, parse_set(args.set))
    train, test = prepare_data(cfg.data)          # data errors surface before any cluster resource
    level = check_finetune(cfg, train)
    if cfg.finetune.batch_size % args.workers:
        raise GrafitError(f"{args.config}: finetune.batch_size: {cfg.finetune.batch_size} must be divisible by "
                          f"--workers {args.workers}")
    source = cfg.finetune.checkpoint or f"a random {cfg.model.trunk}"
    if args.check:
        print(f"{args.config}: ok (fine-tune {source} on {level}, {len(train)} images); nothing was started (--check)")
        return 0
    uri = tracking.tracking_uri()
    tracking.check_server(uri)
    connect_ray(args.ray_address, args.num_cpus)
    name = args.name or f"{cfg.name}-finetune"
    result = tracked_training(cfg, uri=uri, run_name=name, fingerprint=tracking.dataset_fingerprint(train, test),
                              workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                              gpus_per_worker=args.gpus_per_worker, storage_path=args.storage_path, name=name,
                              max_failures=args.max_failures, loop=finetune_loop)
    if result.error:
        print(f"grafit: fine-tuning failed: {result.error}", file=sys.stderr)
        return 1
    m = result.return_value["metrics"]
    print(f"\n== {name}: {source} fine-tuned on {level} ({cfg.finetune.head} head, {cfg.finetune.epochs} epochs) ==")
    print(f"top-1 {100 * m[f'finetune_top1/{level}']:.1f}   top-5 {100 * m[f'finetune_top5/{level}']:.1f}")
    print(f"MLflow run {result.run_id} in {uri}")
    return 0


def add_parser(sub, ray_job_parser) -> None:
    p = ray_job_parser(sub, "finetune", "fine-tune a checkpoint's trunk with a new FC/MLP head (paper §4.6)",
                       "jobs/finetune/omniglot.yaml", "runs/finetune", 1, "checkpoints; every node must reach it")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default 0)")
    p.add_argument("--name", default=None, help="run name (default: <name>-finetune); rerunning a name resumes it")
    p.set_defaults(func=cmd_finetune)
