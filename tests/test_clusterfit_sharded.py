"""ClusterFit+'s k-means sharded over ranks (each holds only its shard_bounds block of the features):
in one process exactly the unsharded k-means behind the published numbers, and the same labels on
every rank at every world size, with k-means++ on all rows or on a sample of them."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from grafit_core.distributed import DistContext
from grafit_core.memory import shard_bounds
from grafit_core.memory import gather_rows
from grafit_core.methods.clusterfit import ClusterFitPlus, seed_sample, spherical_kmeans
from gloo import run_gloo

N, D, K = 503, 16, 10          # 503: W = 2 and W = 3 both leave a shorter last block


def oracle_kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """The unsharded k-means as it was (every rank held all N x d features), copied verbatim."""
    x = F.normalize(x.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    best = torch.full((len(x),), 2.0)
    for _ in range(1, k):
        best = torch.minimum(best, 1 - x @ centers[-1])
        probs = best.clamp(min=0)
        idx = (torch.multinomial(probs, 1, generator=g) if probs.sum() > 0
               else torch.randint(len(x), (1,), generator=g))
        centers.append(x[idx].squeeze(0))
    c = torch.stack(centers)
    for _ in range(iters):
        assign = (x @ c.t()).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = torch.bincount(assign, minlength=k) == 0
        c = torch.where(empty[:, None], c, F.normalize(sums, dim=1))
    return (x @ c.t()).argmax(1)


def blobs(n=N, d=D, k=K, seed=0):
    """k clusters around orthogonal directions: no row is near a tie, whatever order the sums round in."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:k]
    truth = torch.randint(k, (n,), generator=g)
    return centers[truth] + 0.01 * torch.randn(n, d, generator=g), truth


def cfg_of(k, seed):
    return SimpleNamespace(method=SimpleNamespace(clusters=k), seed=seed)


def labels_through_prepare(ctx, x, k, seed):
    """ClusterFit+'s own path: train_stage hands this rank's block only; every rank gets all n labels."""
    a, b = shard_bounds(len(x), ctx.world_size, ctx.rank)
    stage = lambda name, labels: (x[a:b].clone(), len(x), ctx)   # noqa: E731
    return ClusterFitPlus.prepare_labels(cfg_of(k, seed), torch.zeros(len(x), dtype=torch.long), stage)


def sharded_worker(ctx, x):
    """Each case's gathered labels (and this rank's block of them) on this rank."""
    n = len(x)
    a, b = shard_bounds(n, ctx.world_size, ctx.rank)
    out = {"all": labels_through_prepare(ctx, x, K, 3)}
    for m in (100, 300):   # k-means++ on a sample: the sparse (top-up) and the dense (permutation) draw
        own = spherical_kmeans(x[a:b], K, seed=3, ctx=ctx, n=n, max_seed_rows=m)
        out[f"sample{m}"] = (own, gather_rows(own, n, ctx))
    rows = seed_sample(n, 100, 3)
    out["selected"] = gather_rows(x[a:b], n, ctx, rows)
    tiny = x[:4]                # n = 4 over 3 ranks: the last block is empty and still takes part
    ta, tb = shard_bounds(4, ctx.world_size, ctx.rank)
    out["tiny"] = gather_rows(spherical_kmeans(tiny[ta:tb], 2, seed=1, ctx=ctx, n=4), 4, ctx)
    return out


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_one_process_is_exactly_the_unsharded_kmeans(seed):
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(seed))   # random data: near-ties abound
    expected = oracle_kmeans(x, K, seed=seed)
    assert torch.equal(spherical_kmeans(x, K, seed=seed), expected)
    assert torch.equal(spherical_kmeans(x, K, seed=seed, ctx=DistContext(), n=N), expected)
    assert torch.equal(labels_through_prepare(DistContext(), x, K, seed), expected)


def test_seed_sample():
    assert seed_sample(N, N, 0) is None            # up to max_seed_rows: every row, as before
    for m in (100, 300):
        rows = seed_sample(N, m, 5)
        assert len(rows) == m and len(rows.unique()) == m and torch.equal(rows, rows.sort().values)
        assert 0 <= int(rows.min()) and int(rows.max()) < N
        assert torch.equal(rows, seed_sample(N, m, 5)) and not torch.equal(rows, seed_sample(N, m, 6))


def test_blobs_are_recovered():
    """The blobs' labels are the truth up to renaming: no two centers share a blob, so no row is near a tie."""
    from sklearn.metrics import adjusted_rand_score
    x, truth = blobs()
    for m in (N, 100, 300):
        assert adjusted_rand_score(truth.numpy(), spherical_kmeans(x, K, seed=3, max_seed_rows=m).numpy()) == 1.0


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_labels_equal_one_process(world_size):
    x, _ = blobs()
    single = sharded_worker(DistContext(), x)
    assert torch.equal(single["all"], oracle_kmeans(x, K, seed=3))
    results = run_gloo(sharded_worker, world_size, x, timeout=600)   # W spawned torch imports: slow when loaded
    for rank, out in enumerate(results):
        a, b = shard_bounds(N, world_size, rank)
        assert torch.equal(out["all"], single["all"]), rank
        for m in (100, 300):
            own, gathered = out[f"sample{m}"]
            assert torch.equal(gathered, single[f"sample{m}"][1]), (rank, m)
            assert torch.equal(own, gathered[a:b]), (rank, m)
        assert torch.equal(out["selected"], x[seed_sample(N, 100, 3)]), rank
        assert torch.equal(out["tiny"], single["tiny"]), rank
