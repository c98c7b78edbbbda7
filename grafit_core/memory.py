"""The memory M of embeddings of the training set (paper §3.1, "Memory of embeddings").

`MemoryBank` holds the rows [offset, offset + size) of the N x d memory with their
training-level labels; a single process holds all rows (offset 0). A sharded memory
(one contiguous block per worker) implements the same interface with its own block.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from grafit_core.distributed import all_gather_grad
from grafit_core.losses import at_least_fp32, knn_loss, knn_partials, knn_terms


class MemoryBank:
    def __init__(self, labels: torch.Tensor, dim: int, *, offset: int = 0, renormalize: bool = True,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        labels = torch.as_tensor(labels, device=device)
        # int32 where the ids fit (4 bytes a row at 10^8 rows), and a copy: a view would keep the caller's whole array
        fits = len(labels) == 0 or int(labels.max()) < 2 ** 31
        self.labels = labels.to(torch.int32 if fits else torch.long, copy=True)
        self.offset = offset
        self.renormalize = renormalize
        self.bank = torch.zeros(len(self.labels), dim, device=device, dtype=dtype)   # bf16: stored, not computed in
        self.compute_dtype = at_least_fp32(self.bank.dtype)
        self.filled = torch.zeros(len(self.labels), dtype=torch.bool, device=device)

    def __len__(self) -> int:
        return self.bank.shape[0]

    def _local(self, indices: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of this block among `indices`, each once (a padded sampler may repeat an index)."""
        local = indices.to(self.bank.device) - self.offset
        mine = (local >= 0) & (local < len(self))
        local, z = local[mine], z.detach().to(self.bank.device, self.compute_dtype)[mine]
        uniq, inverse = torch.unique(local, return_inverse=True)
        first = torch.full_like(uniq, len(local)).scatter_reduce(
            0, inverse, torch.arange(len(local), device=local.device), reduce="amin")
        return uniq, z[first]

    @torch.no_grad()
    def fill(self, indices: torch.Tensor, z: torch.Tensor) -> None:
        """Write rows as they are (the initial pass over the training set, and the final recompute)."""
        rows, z = self._local(indices, z)
        self.bank[rows] = z.to(self.bank.dtype)
        self.filled[rows] = True

    @torch.no_grad()
    def update(self, indices: torch.Tensor, z: torch.Tensor) -> None:
        """m_i <- normalize((m_i + z_i) / 2) (SNCA); with renormalize=False the paper's literal (m_i + z_i) / 2."""
        rows, z = self._local(indices, z)
        new = (self.bank[rows].to(z.dtype) + z) / 2                 # in fp32 (or wider) whatever the bank's dtype
        self.bank[rows] = (F.normalize(new, dim=1) if self.renormalize else new).to(self.bank.dtype)

    def is_full(self) -> bool:
        return bool(self.filled.all())

    def knn_loss(self, z: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, sigma: float) -> torch.Tensor:
        """L_knn of the queries against this (whole, single-process) memory."""
        return knn_loss(z, labels, indices, self.bank, self.labels, sigma)


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of the memory that `rank` owns: contiguous blocks of ceil(n / W),
    the last one(s) shorter or empty (start = stop = n) when W does not divide n."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    size = -(-n // world_size)
    start = min(rank * size, n)
    return start, min(start + size, n)


def gather_rows(local: Optional[torch.Tensor], n: int, ctx,
                rows: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Rows `rows` (sorted global indices, the same on every rank; None: all n) of the n-row matrix
    whose shard_bounds(n) block this rank holds as `local`, in order, on every rank (None stays None)."""
    if local is None:
        return None
    bounds = [shard_bounds(n, ctx.world_size, r) for r in range(ctx.world_size)]
    if rows is None:
        counts, mine = [b - a for a, b in bounds], local
    else:   # every rank knows how many sampled rows each block holds: no exchange of counts needed
        edges = [torch.searchsorted(rows, torch.tensor(ab)).tolist() for ab in bounds]
        counts = [e - s for s, e in edges]
        s, e = edges[ctx.rank]
        mine = local[rows[s:e] - bounds[ctx.rank][0]]
    if not ctx.distributed:
        return mine
    size = max(counts)      # gloo gathers equal sizes: pad each rank's rows to the largest count
    padded = torch.cat([mine, mine.new_zeros(size - len(mine), *mine.shape[1:])])
    parts = ctx.all_gather_cat(padded.to(ctx.device)).cpu().view(ctx.world_size, size, *mine.shape[1:])
    return torch.cat([parts[r][:c] for r, c in enumerate(counts)])


def _combine_lse(parts: torch.Tensor) -> torch.Tensor:
    """log-sum-exp over dim 0 of per-shard partials; all -inf stays -inf with a zero (not NaN) gradient."""
    finite = torch.isfinite(parts)
    out = torch.logsumexp(parts.masked_fill(~finite, torch.finfo(parts.dtype).min), dim=0)
    return out.masked_fill(~finite.any(0), float("-inf"))


class ShardedMemoryBank(MemoryBank):
    """The memory split across workers: rank r holds only rows shard_bounds(N, W, r).

    knn_loss: all-gather the batch (autograd-aware), each rank computes the partial
    log-sum-exps of every gathered query over its own rows, the partials are all-gathered
    (autograd-aware) and combined, and each rank returns the loss of its own queries divided
    by the global number of valid queries, times W: DDP's gradient averaging then yields
    exactly the single-process mean. Communication per step is O(B_global * d), not O(N).
    """

    def __init__(self, labels: torch.Tensor, dim: int, ctx, *, renormalize: bool = True,
                 dtype: torch.dtype | None = None):
        labels = torch.as_tensor(labels)
        self.num_rows = len(labels)
        start, stop = shard_bounds(self.num_rows, ctx.world_size, ctx.rank)
        super().__init__(labels[start:stop], dim, offset=start, renormalize=renormalize, device=ctx.device,
                         dtype=dtype)
        self.ctx = ctx

    def knn_loss(self, z: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, sigma: float) -> torch.Tensor:
        ctx = self.ctx
        zg = all_gather_grad(z, ctx)
        lg, ig = ctx.all_gather_cat(labels), ctx.all_gather_cat(indices)
        lse_all, lse_same = knn_partials(zg, lg, ig, self.bank, self.labels, sigma, self.offset)
        parts = all_gather_grad(torch.stack([lse_all, lse_same])[None], ctx)       # W x 2 x B_global
        terms, valid = knn_terms(_combine_lse(parts[:, 0]), _combine_lse(parts[:, 1]))
        # every rank holds the combined partials, so V is known everywhere without a collective
        n_valid = valid.sum().clamp(min=1)
        own = slice(ctx.rank * len(z), (ctx.rank + 1) * len(z))
        return terms[own].sum() / n_valid * ctx.world_size

    @torch.no_grad()
    def update(self, indices: torch.Tensor, z: torch.Tensor) -> None:
        """Every rank sees the whole batch's (index, embedding) pairs and writes the rows it owns."""
        super().update(self.ctx.all_gather_cat(indices), self.ctx.all_gather_cat(z.detach()))
