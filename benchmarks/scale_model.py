"""The road to 10^8 images: a cost model of sharded Grafit training, checked against this machine.

    .venv/bin/python benchmarks/scale_model.py               # the table: N = 1.28M, 10M, 100M; W = 8 ... 512
    .venv/bin/python benchmarks/scale_model.py --validate    # first: every formula against measured values

Per worker (rank), n = ceil(N / W) memory rows, B the global batch, d the embedding size, L the label
levels a worker keeps (the training level and the test levels), p the mean relative path length:
  state    bank n.d.s (s = 4 fp32, 2 bf16) + its labels n.4 (int32) + its filled flags n
           + the collection's labels N.8.L (every rank: any rank loads any sample of a global batch)
           + the path index N.(p + 8) (one UTF-8 buffer + int64 offsets; Python strings: ~N.(p + 57))
           + the epoch's permutation N.8 (GlobalBatches)
  step     the kNN loss's activations: B.min(n, chunk).A bytes (A: logits, masks and the masked log-sum-exp
           inputs autograd keeps; knn_partials works in blocks of rows beyond KNN_BLOCK_ELEMENTS)
  bytes    collective buffer bytes per rank per step (a ring all-reduce moves ~2x its buffer):
           all-gathers of z (B.d.4), labels and indices
           (B.16), the partial log-sum-exps (W.2.B.4); backward: their all-reduces (W.2.B.4 + B.d.4); the
           non-finite flag (4); the memory update's all-gathers (B.8 + B.d.4); DDP's gradients (P.4)
  flops    kNN loss forward + backward: 4.B.n.d (6.B.n.d in blocks: the backward recomputes the logits)
  eval     one pass: 2.Q.n.d flops per rank; bytes: the queries (Q.d.4), the top-k candidates
           (W.Q.k.(4 + 8 + 8.L)) and, for each (ranking, level), exact AP's relevant scores and counts
           all-reduced (Q.R.(4 + 8), R = N / classes: what exact AP over a sharded collection needs)
           and the per-shard counts gathered (W.Q.8)
--validate builds the state at small N and compares bytes exactly, runs training steps in W real gloo
processes counting every collective's buffer (exact), measures the kNN step's peak RSS growth (within
2x of the activation formula) and fits one FLOP rate to step times (each point within 2x of it).
The table gives, per (N, W), the worker's state and step costs, and the first limit each configuration
exceeds with this code ("now") and with the code before the blocks, the path index and the sharded
k-means ("before": all B x n logits at once, paths as Python strings, ClusterFit+'s N x d gather).
"""
import argparse
import math
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from grafit_core.distributed import DistContext  # noqa: E402
from grafit_core.losses import KNN_BLOCK_ELEMENTS  # noqa: E402
from grafit_core.memory import ShardedMemoryBank  # noqa: E402

ACT_BYTES = 22      # bytes per (query, row) pair the kNN loss holds at its peak (see --validate)
GIB = 2 ** 30


# ---------------------------------------------------------------- the formulas
def state_bytes(N, W, d, L, p, bank_bytes=4):
    n = -(-N // W)
    return {"bank": n * d * bank_bytes, "bank labels": n * 4, "filled": n, "labels": N * 8 * L,
            "paths": N * (p + 8), "permutation": N * 8}


def step_activation_bytes(B, N, W):
    n = -(-N // W)
    return B * min(n, max(1, KNN_BLOCK_ELEMENTS // B)) * ACT_BYTES


def step_comm_bytes(B, d, W, P):
    forward = B * d * 4 + B * 16 + W * 2 * B * 4
    backward = W * 2 * B * 4 + B * d * 4
    return forward + backward + 4 + B * 8 + B * d * 4 + P * 4


def step_flops(B, N, W, d):
    """Forward and backward products of the kNN loss; in blocks the backward recomputes the logits."""
    n = -(-N // W)
    return (6 if B * n > KNN_BLOCK_ELEMENTS else 4) * B * n * d


def before_bytes(B, N, W, d, p):
    """What the previous code held: all B x n activations at once, the paths as Python strings (a
    20-character root repeated: 49 bytes of header + 8 of list slot), ClusterFit+'s N x d gather."""
    n = -(-N // W)
    return B * n * ACT_BYTES, N * (p + 20 + 57), N * d * 4


def eval_pass_bytes(Q, N, W, k, classes, rankings):
    """The one pass's collectives (metrics.evaluate_pass): the shards' layout, the top-k candidates of
    every level, then per (ranking, level) exact AP's per-shard counts, thresholds and counts at or above."""
    ap = rankings * sum(Q * (N / c) * 12 + W * Q * 8 for c in classes)
    return W * 16 + W * Q * k * (4 + 8 + 8 * len(classes)) + ap


def eval_cost(Q, N, W, d, k, classes, rankings):
    """(FLOPs, bytes) of one evaluation per rank: the pass's product, the queries gathered + the pass."""
    return 2 * Q * -(-N // W) * d, Q * d * 4 + eval_pass_bytes(Q, N, W, k, classes, rankings)


# ---------------------------------------------------------------- measurements (--validate)
def measured_state(N, W, d, L, p):
    """The objects a worker builds, their bytes: rank 0's memory shard, L label arrays, a path index."""
    from grafit_core.data.hierarchy import build_hierarchy
    from grafit_core.data.images import PathIndex
    from grafit_core.data.views import GlobalBatches
    labels = torch.randint(0, 1000, (N,))
    memory = ShardedMemoryBank(labels, d, DistContext(rank=0, world_size=W))
    names = [f"/data/set/{i % 97:0{p - 8}d}/{i:07d}" for i in range(N)]   # relative part: p characters
    assert all(len(s) - len("/data/set/") == p for s in names[:3])
    # the label arrays as every loader builds them: one class name per sample and level, coarse -> fine
    _, collection_labels = build_hierarchy([f"l{j}" for j in range(L)],
                                           [[f"c{i % 10 ** j}" for j in range(1, L + 1)] for i in range(N)])
    return {"bank": memory.bank.nbytes, "bank labels": memory.labels.nbytes, "filled": memory.filled.nbytes,
            "labels": sum(a.nbytes for a in collection_labels.values()),
            "paths": PathIndex(names).nbytes - len("/data/set/"),
            "permutation": GlobalBatches(N, 8, 1, 0, 0).permutation().nbytes}


def counting_collectives() -> list:
    """Patch this process's all_gather / all_reduce to append each call's buffer bytes (an all-gather:
    its output) to the returned list; the gloo processes of --validate are thrown away after."""
    import torch.distributed as dist
    moved = []
    gather, reduce = dist.all_gather, dist.all_reduce
    dist.all_gather = lambda out, t, *a, **k: (moved.append(t.numel() * t.element_size() * len(out)),
                                               gather(out, t, *a, **k))[1]
    dist.all_reduce = lambda t, *a, **k: (moved.append(t.numel() * t.element_size()), reduce(t, *a, **k))[1]
    return moved


def counted_step(ctx, n, d, batch, in_dim):
    """One training step's collectives, as train_one_epoch makes them, each buffer counted."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    moved = counting_collectives()
    torch.manual_seed(0)
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(in_dim, d))
    net.register_comm_hook(None, allreduce_hook)           # DDP's all-reduce through Python, so it is counted
    params = sum(q.numel() for q in net.parameters())
    g = torch.Generator().manual_seed(ctx.rank)
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    memory = ShardedMemoryBank(labels, d, ctx)
    memory.fill(torch.arange(memory.offset, memory.offset + len(memory)), F.normalize(torch.randn(len(memory), d)))
    moved.clear()
    idx = torch.randint(0, n, (batch // ctx.world_size,), generator=g)
    z = net(torch.randn(len(idx), in_dim, generator=g))
    loss = memory.knn_loss(z, labels[idx], idx, 0.05)
    ctx.all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
    loss.backward()
    memory.update(idx, z.detach())
    return sum(moved), params


def counted_eval(ctx, n, q, d, k, classes):
    """The collectives' bytes of one evaluation pass over balanced classes (every R = n / c), counted."""
    from grafit_core.memory import shard_bounds
    from grafit_core.metrics import Ranking, evaluate_pass
    moved = counting_collectives()
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(n, d, generator=g), torch.randn(q, d, generator=g)
    lo, hi = shard_bounds(n, ctx.world_size, ctx.rank)
    levels = {f"l{i}": c for i, c in enumerate(classes)}
    evaluate_pass(queries, bank[lo:hi], lo, {lv: torch.arange(lo, hi) % c for lv, c in levels.items()},
                  {lv: torch.arange(q) % c for lv, c in levels.items()}, levels, ctx,
                  votes={(lv, k, 0.05) for lv in levels}, ap_levels=list(levels), rankings={"cosine": Ranking()})
    return sum(moved)


def peak_child(batch, n, d):
    """Run in a fresh process: the peak RSS growth (bytes) of one kNN loss forward + backward."""
    z = torch.randn(batch, d, requires_grad=True)
    bank, labels = F.normalize(torch.randn(n, d), dim=1), torch.randint(0, 100, (n,))
    from grafit_core.losses import knn_loss
    knn_loss(z[:2], labels[:2], torch.arange(2), bank[:64], labels[:64], 0.05).backward()   # warm the allocator
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    knn_loss(z, labels[:batch], torch.arange(batch), bank, labels, 0.05).backward()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)


def measured_peak(batch, n, d):
    code = f"import sys; sys.path.insert(0, {ROOT!r}); sys.argv = ['x']; " \
           f"from benchmarks.scale_model import peak_child; peak_child({batch}, {n}, {d})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return int(out.stdout.split()[-1])


def step_time(batch, n, d, repeats=3):
    """Seconds of one kNN loss forward + backward + memory update (one process, one thread)."""
    from grafit_core.memory import MemoryBank
    labels = torch.randint(0, 100, (n,))
    memory = MemoryBank(labels, d)
    memory.fill(torch.arange(n), F.normalize(torch.randn(n, d), dim=1))
    best = math.inf
    for _ in range(repeats):
        z = torch.randn(batch, d, requires_grad=True)
        idx = torch.randint(0, n, (batch,))
        start = time.perf_counter()
        memory.knn_loss(z, labels[idx], idx, 0.05).backward()
        memory.update(idx, z.detach())
        best = min(best, time.perf_counter() - start)
    return best


def validate(args):
    from gloo import run_gloo
    ok = True
    print("state per worker, bytes (formula = measured, exactly):")
    for N, W, L, p in ((20_000, 2, 2, 30), (50_001, 3, 3, 41)):
        want, got = state_bytes(N, W, args.dim, L, p), measured_state(N, W, args.dim, L, p)
        same = want == got
        ok &= same
        print(f"  N={N} W={W} L={L} p={p}: {'equal' if same else f'DIFFER {want} vs {got}'} "
              f"({sum(got.values()) / 2**20:.1f} MiB)")
    print("collective bytes per training step, counted in W gloo processes (formula = measured, exactly):")
    for n, W, batch in ((2_000, 2, 64), (8_000, 2, 64), (3_001, 3, 96)):
        got = run_gloo(counted_step, W, n, args.dim, batch, 48)
        moved, params = got[0]
        want = step_comm_bytes(batch, args.dim, W, params)
        ok &= moved == want and len({m for m, _ in got}) == 1
        print(f"  n={n} W={W} B={batch} P={params}: measured {moved}, formula {want}")
    print("collective bytes of one evaluation pass (kNN at every level, exact mAP), W gloo processes (exactly):")
    for n, W, q, classes in ((6_000, 2, 200, (10, 3)), (6_000, 3, 150, (20, 4, 2))):
        got = run_gloo(counted_eval, W, n, q, 16, 5, classes)
        want = eval_pass_bytes(q, n, W, 5, classes, 1)
        ok &= len(set(got)) == 1 and got[0] == want
        print(f"  n={n} W={W} Q={q} classes={classes}: measured {got[0]}, formula {want:.0f}")
    print(f"kNN loss peak memory, one process (formula B.min(n, block).{ACT_BYTES} vs peak RSS growth; within 2x):")
    for batch, n in ((256, 40_000), (512, 60_000), (2048, 80_000)):
        got, want = measured_peak(batch, n, args.dim), step_activation_bytes(batch, n, 1)
        ok &= 0.5 <= got / want <= 2
        print(f"  B={batch} n={n}: measured {got / 2**20:.0f} MiB, formula {want / 2**20:.0f} MiB, "
              f"ratio {got / want:.2f}")
    torch.set_num_threads(1)
    points = [(b, n) for b in (128, 512) for n in (10_000, 40_000, 120_000)]
    times = np.array([step_time(b, n, args.dim) for b, n in points])
    flops = np.array([step_flops(b, n, 1, args.dim) for b, n in points], dtype=float)
    rate = float(np.exp(np.mean(np.log(flops / times))))        # the geometric mean: errors are ratios
    print(f"kNN step time (forward, backward, memory update), one thread: one rate fits all, "
          f"{rate / 1e9:.1f} GFLOP/s; each point within 2x:")
    for (b, n), t, f in zip(points, times, flops):
        pred = f / rate
        ok &= 0.5 <= t / pred <= 2
        print(f"  B={b} n={n}{' (blocks)' if b * n > KNN_BLOCK_ELEMENTS else ''}: measured {1000 * t:.1f} ms, "
              f"fit {1000 * pred:.1f} ms, ratio {t / pred:.2f}")
    print("validation:", "PASS" if ok else "FAIL")
    return ok


# ---------------------------------------------------------------- the table
def first_limit(device, host, secs, args):
    for bad, why in ((device > args.device_gib * GIB, "accelerator memory"), (host > args.host_gib * GIB, "host RAM"),
                     (secs > args.step_budget_s, "kNN step time")):
        if bad:
            return why
    return "-"


def table(args):
    print(f"d={args.dim}, global batch {args.batch}, L={args.levels} label levels, paths {args.path_bytes} B, "
          f"P={args.params / 1e6:.1f}M parameters, bank {args.bank_bytes} B/value, Q={args.queries}, k={args.k}, "
          f"classes {args.classes}, {args.rankings} rankings; "
          f"limits per worker: {args.host_gib:g} GiB host RAM, {args.device_gib:g} GiB accelerator memory, "
          f"{args.step_budget_s:g} s of kNN loss per step at {args.tflops:g} TFLOP/s")
    print(f"{'N':>7s} {'W':>4s} {'bank GiB':>8s} {'host GiB':>8s} {'kNN act GiB':>11s} {'MB/step':>8s} "
          f"{'kNN TFLOP/step':>14s} {'kNN s/step':>10s} {'eval TFLOP':>10s} {'eval GB moved':>13s}  "
          f"{'first limit now':<20s} before")
    for N in args.sizes:
        for W in args.workers:
            s = state_bytes(N, W, args.dim, args.levels, args.path_bytes, args.bank_bytes)
            act = step_activation_bytes(args.batch, N, W)
            device, host = s["bank"] + s["bank labels"] + s["filled"] + act, s["labels"] + s["paths"] + s["permutation"]
            flops = step_flops(args.batch, N, W, args.dim)
            e_flops, e_bytes = eval_cost(args.queries, N, W, args.dim, args.k, args.classes, args.rankings)
            old_act, old_paths, gather = before_bytes(args.batch, N, W, args.dim, args.path_bytes)
            now = first_limit(device, host, flops / (args.tflops * 1e12), args)
            before = first_limit(device - act + old_act, host - s["paths"] + old_paths + gather,
                                 4 * args.batch * -(-N // W) * args.dim / (args.tflops * 1e12), args)
            print(f"{N / 1e6:6.2f}M {W:4d} {s['bank'] / GIB:8.2f} {host / GIB:8.2f} {act / GIB:11.2f} "
                  f"{step_comm_bytes(args.batch, args.dim, W, args.params) / 1e6:8.1f} {flops / 1e12:14.2f} "
                  f"{flops / (args.tflops * 1e12):10.3f} {e_flops / 1e12:10.1f} {e_bytes / 1e9:13.2f}  "
                  f"{now:<20s} {before}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validate", action="store_true", help="check every formula against measurements first")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.28e6, 1e7, 1e8], help="collection sizes N")
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32, 128, 512], help="world sizes W")
    parser.add_argument("--dim", type=int, default=128, help="embedding size d")
    parser.add_argument("--batch", type=int, default=4096, help="global batch B")
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 127],
                        help="classes of each test level (ImageNet: 1000 fine, 127 coarse); L = their number")
    parser.add_argument("--rankings", type=int, default=3, help="mAP rankings per level (cosine, cond, oracle)")
    parser.add_argument("--path-bytes", type=int, default=40, help="mean relative image path length p")
    parser.add_argument("--params", type=float, default=25.6e6, help="network parameters P (ResNet-50: 25.6M)")
    parser.add_argument("--bank-bytes", type=int, default=4, choices=[2, 4], help="bytes per memory value (bf16: 2)")
    parser.add_argument("--queries", type=int, default=50_000, help="evaluation queries Q")
    parser.add_argument("--k", type=int, default=20, help="the kNN evaluation's k")
    parser.add_argument("--host-gib", type=float, default=32,
                        help="host RAM per worker (limit; e.g. 256 GiB shared by 8 accelerators)")
    parser.add_argument("--device-gib", type=float, default=80, help="accelerator memory per worker (limit)")
    parser.add_argument("--tflops", type=float, default=100, help="sustained kNN matrix-product rate per worker")
    parser.add_argument("--step-budget-s", type=float, default=1.0, help="kNN seconds per step still acceptable")
    args = parser.parse_args()
    args.sizes, args.levels = [int(n) for n in args.sizes], len(args.classes)
    if args.validate and not validate(args):
        sys.exit(1)
    table(args)


if __name__ == "__main__":
    main()
