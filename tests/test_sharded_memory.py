"""The sharded memory in real gloo processes equals the single-process kNN loss, gradients and update,
at W = 2, 3, 4 and 8 (more processes than cores is fine for gloo)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from grafit_core.distributed import DistContext
from grafit_core.losses import knn_loss
from grafit_core.memory import MemoryBank, ShardedMemoryBank, shard_bounds
from gloo import run_gloo

torch.set_num_threads(1)
D, IN, B, SIGMA = 8, 5, 4, 0.3


def bank_size(world_size):
    """23 rows up to W = 4, 37 at W = 8 (room for every rank's distinct queries): divisible by no W."""
    return 23 if world_size <= 4 else 37


def problem(world_size):
    """Bank, labels and per-rank batches chosen so that, at every W tested:
    - N is not divisible by W;
    - rank 0 has two left-out queries (labels 7 and 8 have one row: the query's own, or none), the
      other ranks none (uneven numbers of left-out samples);
    - label 5 lives only in the last rows (the last shard), queried from rank 0;
    - no row is queried twice in the step."""
    n = bank_size(world_size)
    g = torch.Generator().manual_seed(world_size)
    labels = torch.tensor([0, 1, 2, 3] * 4 + [7] + [i % 4 for i in range(n - 19)] + [5, 5])
    bank = F.normalize(torch.randn(n, D, generator=g), dim=1)
    x = torch.randn(world_size * B, IN, generator=g)
    others = [i for i in range(n) if i not in (3, 16, n - 1, 4)][:B * (world_size - 1)]
    q_labels = torch.tensor([5, 7, 8, 0] + labels[others].tolist())
    q_indices = torch.tensor([3, 16, n - 1, 4] + others)
    weight = torch.randn(D, IN, generator=g)
    return labels, bank, x, q_labels, q_indices, weight


def single_process(world_size):
    labels, bank, x, q_labels, q_indices, weight = problem(world_size)
    model = torch.nn.Linear(IN, D, bias=False)
    model.weight.data.copy_(weight)
    z = model(x)
    loss = knn_loss(z, q_labels, q_indices, bank, labels, SIGMA)
    loss.backward()
    memory = MemoryBank(labels, D)
    memory.fill(torch.arange(len(labels)), bank)
    memory.update(q_indices, z.detach())
    return float(loss.detach()), model.weight.grad.clone(), memory.bank.clone()


def sharded_worker(ctx: DistContext, world_size):
    labels, bank, x, q_labels, q_indices, weight = problem(world_size)
    model = torch.nn.Linear(IN, D, bias=False)
    model.weight.data.copy_(weight)
    ddp = DistributedDataParallel(model)
    memory = ShardedMemoryBank(labels, D, ctx)
    lo, hi = shard_bounds(len(labels), world_size, ctx.rank)
    memory.fill(torch.arange(lo, hi), bank[lo:hi])
    own = slice(ctx.rank * B, (ctx.rank + 1) * B)
    z = ddp(x[own])
    loss = memory.knn_loss(z, q_labels[own], q_indices[own], SIGMA)
    loss.backward()                                   # DDP averages the gradients over ranks
    global_loss = ctx.all_reduce_sum(loss.detach()) / world_size
    memory.update(q_indices[own], z.detach())
    return float(global_loss), model.weight.grad.clone(), (lo, hi, memory.bank.clone(), len(memory))


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_sharded_loss_gradients_and_update_equal_single_process(world_size):
    loss, grad, bank = single_process(world_size)
    n = bank_size(world_size)
    results = run_gloo(sharded_worker, world_size, world_size)
    for r, (l_r, g_r, (lo, hi, shard, rows)) in enumerate(results):
        assert l_r == pytest.approx(loss, abs=1e-5)
        assert torch.allclose(g_r, grad, atol=1e-5), (r, (g_r - grad).abs().max())
        assert torch.allclose(shard, bank[lo:hi], atol=1e-6)
        assert rows == hi - lo <= -(-n // world_size)
    assert sum(res[2][3] for res in results) == n


@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_problem_has_the_cases_it_claims(world_size):
    labels, bank, x, q_labels, q_indices, weight = problem(world_size)
    n = bank_size(world_size)
    assert n % world_size and len(set(q_indices.tolist())) == len(q_indices) == world_size * B
    assert torch.equal(q_labels[4:], labels[q_indices[4:]])
    valid = [int(((labels == l) & (torch.arange(n) != i)).sum()) > 0 for l, i in zip(q_labels, q_indices)]
    assert valid[:4] == [True, False, False, True] and all(valid[4:])
    last = set(range(*shard_bounds(n, world_size, world_size - 1)))
    assert set(torch.nonzero(labels == 5).flatten().tolist()) <= last


def bytes_worker(ctx: DistContext, n):
    """Bytes moved by one training step's collectives with a bank of n rows."""
    moved = []
    orig_gather, orig_reduce = dist.all_gather, dist.all_reduce

    def gather(out, t, *a, **k):
        moved.append(t.numel() * t.element_size() * len(out))
        return orig_gather(out, t, *a, **k)

    def reduce(t, *a, **k):
        moved.append(t.numel() * t.element_size())
        return orig_reduce(t, *a, **k)

    dist.all_gather, dist.all_reduce = gather, reduce
    try:
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(0, 10, (n,), generator=g)
        memory = ShardedMemoryBank(labels, 32, ctx)
        lo, hi = shard_bounds(n, ctx.world_size, ctx.rank)
        memory.fill(torch.arange(lo, hi), F.normalize(torch.randn(hi - lo, 32, generator=g), dim=1))
        z = torch.randn(16, 32, generator=g, requires_grad=True)
        idx = torch.arange(16) + 16 * ctx.rank
        memory.knn_loss(z, labels[idx], idx, 0.1).backward()
        memory.update(idx, z.detach())
    finally:
        dist.all_gather, dist.all_reduce = orig_gather, orig_reduce
    return sum(moved), len(memory), memory.bank.numel()


def test_communication_is_independent_of_n_and_each_worker_holds_its_share():
    small = run_gloo(bytes_worker, 2, 10_000)
    large = run_gloo(bytes_worker, 2, 40_000)
    assert [s[0] for s in small] == [l[0] for l in large]
    assert [s[1] for s in small] == [5_000, 5_000] and [l[1] for l in large] == [20_000, 20_000]
    assert all(l[2] == 20_000 * 32 for l in large)
    # B_global x d floats, a few times over: nothing near the 40k x 32 bank
    assert large[0][0] < 40_000 * 32 * 4 / 50
