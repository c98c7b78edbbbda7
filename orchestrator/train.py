"""`grafit local` (one process, no Ray), `grafit train` and `grafit finetune` (Ray Train, MLflow)."""
from __future__ import annotations

import json
import os
import sys
import time

from orchestrator import tracking
from orchestrator.job import parse_set
from orchestrator.prepare import format_table, launch, max_failures, prepare
from orchestrator.workers import tracked_training

METRIC_COLUMNS = ["k", "knn_top1", "map_cosine", "map_at_r", "map_cond", "map_oracle"]


def cmd_local(args) -> int:
    """Train and evaluate each method in this process and print the comparison."""
    from grafit_core.config import with_overrides
    from grafit_core.engine import fit

    prep = prepare("local", args)
    cfg = prep.job.config
    print(f"data: {cfg.data.name} train={len(prep.train)} query={len(prep.query)} "
          f"levels={prep.train.hierarchy.levels}", flush=True)
    rows, results = [], {}
    for name in (args.methods or cfg.method.name).split(","):
        start = time.time()
        res = fit(with_overrides(cfg, {"method.name": name}), prep.train, prep.query,
                  log=lambda s: print(s, flush=True))
        rows.append({"method": name, "train_level": cfg.data.train_level,
                     "minutes": f"{(time.time() - start) / 60:.1f}", **res.metrics,
                     **({"note": res.skipped} if res.skipped else {})})
        results[name] = {"metrics": res.metrics, "history": res.history, "skipped": res.skipped}
    for lv in prep.columns:
        print(f"\n== test level: {lv} (trained on {cfg.data.train_level}; kNN top-1 and mAP, %) ==")
        print(format_table(rows, ["method", *(f"{m}/{lv}" for m in METRIC_COLUMNS)]))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        tmp = args.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"config": args.config, "overrides": parse_set(args.set), "results": results}, f, indent=1)
        os.replace(tmp, args.output)           # atomic: a killed run never leaves half a file
        print(f"\nresults written to {args.output}")
    return 0


def run_on_ray(kind: str, args):
    """train / finetune: prepare, then one tracked Ray Train run; None after --check."""
    prep = prepare(kind, args)
    if not launch(prep):
        return None, prep
    name = args.name or (prep.job.config.name if kind == "train" else f"{prep.job.config.name}-finetune")
    result = tracked_training(prep.job, uri=tracking.tracking_uri(), run_name=name, fingerprint=prep.fingerprint,
                              task="fit" if kind == "train" else "finetune", workers=args.workers,
                              cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                              storage_path=args.storage_path, name=name,
                              max_failures=max_failures(args, args.workers), resize_interval_s=args.resize_interval_s,
                              echo=not args.verbose)
    if result.error:
        print(f"grafit: {'training' if kind == 'train' else 'fine-tuning'} failed: {result.error}", file=sys.stderr)
    return result, prep


def cmd_train(args) -> int:
    """Validate everything locally, then train on Ray with W workers."""
    result, prep = run_on_ray("train", args)
    if result is None or result.error:
        return 1 if result is not None else 0
    cfg, final = prep.job.config, result.return_value
    print(f"\n== {cfg.name}: {cfg.method.name} trained on {cfg.data.train_level} with {args.workers} workers "
          f"({result.wall_s:.0f}s) ==")
    if final["skipped"]:
        print(f"skipped: {final['skipped']}")
    else:
        rows = [{"test level": lv, **{k.split("/")[0]: v for k, v in final["metrics"].items() if k.endswith(f"/{lv}")}}
                for lv in prep.columns]
        print(format_table(rows, ["test level", *METRIC_COLUMNS]))
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else '-'}")
    print(tracking.where(tracking.tracking_uri(), result.run_id, "run"))
    return 0


def cmd_finetune(args) -> int:
    """Validate locally, then fine-tune on Ray with W workers, tracked in MLflow."""
    result, prep = run_on_ray("finetune", args)
    if result is None or result.error:
        return 1 if result is not None else 0
    cfg, level, m = prep.job.config, prep.levels[0], result.return_value["metrics"]
    print(f"\n== {args.name or cfg.name + '-finetune'}: {cfg.finetune.checkpoint or f'a random {cfg.model.trunk}'} "
          f"fine-tuned on {level} ({cfg.finetune.head} head, {cfg.finetune.epochs} epochs) ==")
    print(f"top-1 {100 * m[f'finetune_top1/{level}']:.1f}   top-5 {100 * m[f'finetune_top5/{level}']:.1f}")
    print(tracking.where(tracking.tracking_uri(), result.run_id, "run"))
    return 0
