"""Sharded memory: bytes communicated per training step and bank memory per worker as N grows.

    .venv/bin/python benchmarks/sharded_memory.py [--workers 2] [--sizes 10000 40000 160000 640000]

Runs W real gloo processes; each step all-gathers the batch and the per-shard log-sum-exps
and updates the memory. Goal: communication flat in N, memory per worker = ceil(N/W) rows.
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grafit_core.distributed import DistContext  # noqa: E402
from grafit_core.memory import ShardedMemoryBank, shard_bounds  # noqa: E402


def step_cost(rank, world_size, init_file, n, dim, batch, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    ctx = DistContext(rank=rank, world_size=world_size)
    moved = []
    gather, reduce = dist.all_gather, dist.all_reduce
    dist.all_gather = lambda out, t, *a, **k: (moved.append(t.numel() * t.element_size() * len(out)),
                                               gather(out, t, *a, **k))[1]
    dist.all_reduce = lambda t, *a, **k: (moved.append(t.numel() * t.element_size()), reduce(t, *a, **k))[1]
    g = torch.Generator().manual_seed(rank)
    labels = torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(0))
    memory = ShardedMemoryBank(labels, dim, ctx)
    lo, hi = shard_bounds(n, world_size, rank)
    memory.fill(torch.arange(lo, hi), F.normalize(torch.randn(hi - lo, dim, generator=g), dim=1))
    per_rank = batch // world_size
    times = []
    for step in range(4):
        moved.clear()
        z = torch.randn(per_rank, dim, generator=g, requires_grad=True)
        idx = torch.randint(0, n, (per_rank,), generator=g)
        start = time.perf_counter()
        memory.knn_loss(z, labels[idx], idx, 0.05).backward()
        memory.update(idx, z.detach())
        times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put((sum(moved), memory.bank.numel() * memory.bank.element_size(), len(memory), min(times[1:])))
    dist.barrier()
    dist.destroy_process_group()


def measure(n, world_size, dim, batch):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=step_cost, args=(r, world_size, os.path.join(tmp, "init"), n, dim, batch, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        out = queue.get(timeout=600)
        for p in procs:
            p.join()
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="gloo processes (<= cores)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 40_000, 160_000, 640_000],
                        help="memory sizes N to compare")
    parser.add_argument("--dim", type=int, default=128, help="embedding size d")
    parser.add_argument("--batch", type=int, default=256, help="global batch size")
    args = parser.parse_args()
    print(f"W={args.workers} d={args.dim} global batch={args.batch}")
    print(f"{'N':>9s} {'bytes/step':>12s} {'vs first N':>10s} {'bank MiB/worker':>16s} {'rows/worker':>12s} "
          f"{'full bank MiB':>14s} {'step ms':>8s}")
    base = None
    for n in args.sizes:
        moved, bank_bytes, rows, seconds = measure(n, args.workers, args.dim, args.batch)
        base = base or moved
        print(f"{n:9d} {moved:12d} {moved / base:10.2f} {bank_bytes / 2**20:16.2f} {rows:12d} "
              f"{n * args.dim * 4 / 2**20:14.2f} {1000 * seconds:8.1f}")


if __name__ == "__main__":
    main()
