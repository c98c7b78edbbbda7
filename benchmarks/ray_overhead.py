"""Epoch time through Ray Train's TorchTrainer (1 worker) / the plain grafit_core loop, same threads.

    .venv/bin/python benchmarks/ray_overhead.py [--config jobs/omniglot.yaml] [--epochs 2] [--threads 1]

Both runs execute the same `grafit_core.engine.fit`; the ratio of their mean epoch times is the
cost of running inside a Ray worker (goal <= 1.05). Ray's start-up (ray.init, worker group,
data loading in the worker) is reported separately.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from grafit_core.config import load_config  # noqa: E402
from grafit_core.data import prepare_data  # noqa: E402
from grafit_core.engine import fit  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "jobs", "omniglot.yaml"), help="job file")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run (the first one is included)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both runs")
    parser.add_argument("--storage-path", default=os.path.join(ROOT, "runs", "bench_ray"), help="Ray checkpoints")
    args = parser.parse_args()
    cfg = load_config(args.config, {"optim.epochs": args.epochs})

    torch.set_num_threads(args.threads)
    train, query = prepare_data(cfg.data)
    start = time.time()
    plain = fit(cfg, train, query, log=lambda s: None)
    plain_wall = time.time() - start
    plain_epoch = sum(h["epoch_time_s"] for h in plain.history) / len(plain.history)

    import ray
    from orchestrator.workers import run_training
    start = time.time()
    ray.init(address="local", num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    init_s = time.time() - start
    result = run_training(cfg, workers=1, cpus_per_worker=args.threads, storage_path=args.storage_path,
                          name=f"overhead-{int(time.time())}", max_failures=0)
    ray.shutdown()
    history = result.return_value["history"]
    ray_epoch = sum(h["epoch_time_s"] for h in history) / len(history)
    epochs_s = sum(h["epoch_time_s"] for h in history)
    print(f"{cfg.name}: {args.epochs} epochs, {args.threads} thread(s), {len(train)} training images")
    print(f"plain loop:        {plain_epoch:8.2f} s/epoch   (whole fit {plain_wall:.1f} s)")
    print(f"TorchTrainer (1w): {ray_epoch:8.2f} s/epoch   (whole fit {result.wall_s:.1f} s)")
    print(f"ratio TorchTrainer / plain epoch time: {ray_epoch / plain_epoch:.3f}   (goal <= 1.05)")
    plain_outside = plain_wall - plain_epoch * args.epochs
    print(f"Ray start-up: ray.init {init_s:.1f} s; fit outside epochs (worker group, data, memory "
          f"init, evaluation, checkpoints) {result.wall_s - epochs_s:.1f} s vs plain {plain_outside:.1f} s")


if __name__ == "__main__":
    main()
