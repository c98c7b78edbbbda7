"""Run a function in W real gloo processes (torch.multiprocessing, spawn) and collect results.

    results = run_gloo(fn, world_size, *args)   # fn(ctx: DistContext, *args) -> picklable

`fn` must be importable (defined at module level of a test module). Each process gets
one thread, so results are deterministic and the 2-core machine is not oversubscribed.
"""
import os
import pickle
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grafit_core.distributed import DistContext


def _worker(rank, world_size, init_file, fn, args, queue):
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        out = fn(DistContext(rank=rank, world_size=world_size), *args)
        # plain pickle: tensors sent through the queue by reference would die with this process
        queue.put((rank, "ok", pickle.dumps(out)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(fn, world_size, *args, timeout=120):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in range(world_size):
                rank, status, out = queue.get(timeout=timeout)
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed:\n{out}")
                results[rank] = pickle.loads(out)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [results[r] for r in range(world_size)]
