"""ClusterFit+ (Yan et al. 2020, with Grafit's training recipe, paper §4.2):
train the CE baseline on the given labels, cluster its features with k-means, then
train a fresh CE network on the cluster ids. `method.clusters` sets k-means' k.

The k-means is sharded like the memory: each rank holds only its shard_bounds block of the
N x d features (gathering them all would cost N x d floats per rank: 51 GB at N = 10^8, d = 128).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from grafit_core.distributed import DistContext
from grafit_core.memory import gather_rows, shard_bounds
from grafit_core.methods.base import Method

# k-means++ seeds on at most this many rows. Up to it the sample is every row, so the seeding (and the
# whole k-means in one process) is exactly that of the unsharded k-means behind the published numbers.
MAX_SEED_ROWS = 100_000


def seed_sample(n: int, max_rows: int, seed: int) -> Optional[torch.Tensor]:
    """Sorted global indices of the rows k-means++ seeds on, the same on every rank; None: all n rows."""
    if n <= max_rows:
        return None
    g = torch.Generator().manual_seed(seed)
    if n <= 2 * max_rows:       # dense: a permutation of n costs little
        return torch.randperm(n, generator=g)[:max_rows].sort().values
    # sparse: draw with replacement and top up the duplicates, in O(max_rows) memory instead of a
    # permutation's O(n); the draw is symmetric in the rows, so the subset is uniform all the same
    picked = torch.zeros(0, dtype=torch.long)
    while len(picked) < max_rows:
        picked = torch.unique(torch.cat([picked, torch.randint(n, (max_rows - len(picked),), generator=g)]))
    return picked


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0, ctx: DistContext = DistContext(),
                     n: Optional[int] = None, max_seed_rows: int = MAX_SEED_ROWS) -> torch.Tensor:
    """k-means on the unit sphere (cosine), k-means++ seeding. x: this rank's shard_bounds(n) block of
    the n rows (all of them in one process, n defaults to len(x)); returns that block's cluster ids.
    Every rank must call it (collectives); every rank ends with the same centers."""
    n = len(x) if n is None else n
    start, stop = shard_bounds(n, ctx.world_size, ctx.rank)
    if len(x) != stop - start:
        raise ValueError(f"rank {ctx.rank} holds {len(x)} rows, its block of {n} is [{start}, {stop})")
    x = F.normalize(x.float(), dim=1)
    # k-means++ on a sample gathered to every rank: the same rows and generator everywhere give the same
    # centers everywhere (no broadcast), whatever the world size
    xs = gather_rows(x, n, ctx, seed_sample(n, max_seed_rows, seed))
    g = torch.Generator().manual_seed(seed)
    centers = [xs[torch.randint(len(xs), (1,), generator=g)].squeeze(0)]
    best = torch.full((len(xs),), 2.0)
    for _ in range(1, k):
        best = torch.minimum(best, 1 - xs @ centers[-1])
        probs = best.clamp(min=0)
        idx = (torch.multinomial(probs, 1, generator=g) if probs.sum() > 0
               else torch.randint(len(xs), (1,), generator=g))
        centers.append(xs[idx].squeeze(0))
    del xs, best
    c = torch.stack(centers)
    # Lloyd: each rank assigns its own rows; the summed per-cluster sums and counts give every rank the
    # same new centers. (Across world sizes the sums round in another order: identical unless a row is
    # within rounding of a tie.)
    for _ in range(iters):
        assign = (x @ c.t()).argmax(1)
        sums = ctx.all_reduce_sum(torch.zeros_like(c).index_add_(0, assign, x).to(ctx.device)).cpu()
        counts = ctx.all_reduce_sum(torch.bincount(assign, minlength=k).to(ctx.device)).cpu()
        c = torch.where((counts == 0)[:, None], c, F.normalize(sums, dim=1))   # an empty cluster keeps its center
    return (x @ c.t()).argmax(1)


class ClusterFitPlus(Method):
    defaults = {"w_knn": 0.0, "w_inst": 0.0, "w_ce": 1.0, "projector": "none"}

    @classmethod
    def prepare_labels(cls, cfg, labels: torch.Tensor, train_stage) -> torch.Tensor:
        features, n, ctx = train_stage("ce", labels)    # stage 1: the CE baseline on the given labels
        ids = spherical_kmeans(features, cfg.method.clusters, seed=cfg.seed, ctx=ctx, n=n)
        # any rank may draw any sample, so every rank needs all n pseudo-labels: n ints, not n x d floats
        return gather_rows(ids, n, ctx)
