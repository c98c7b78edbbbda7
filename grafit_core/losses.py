"""Grafit's losses (paper §3.1): the kNN loss (eq. 2-3), the instance loss (eq. 1), cross-entropy.

`knn_partials` returns per-query log-sum-exps over a block of memory rows, so that a
sharded memory (one block per worker) can combine blocks exactly before taking the loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kNN loss, the memory update and the online kNN compute in: fp32, or float64 kept."""
    return torch.promote_types(dtype, torch.float32)


KNN_BLOCK_ELEMENTS = 2 ** 24   # (query, row) pairs held at once; beyond, the rows go in blocks (O(B x block) memory)


def knn_partials(z: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                 bank: torch.Tensor, bank_labels: torch.Tensor, sigma: float,
                 offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exps of exp(cos(z_i, m_j)/sigma) over the rows of `bank`, excluding each query's own row.

    `bank` holds the global rows [offset, offset + len(bank)); `indices` are global.
    Returns (lse_all, lse_same): over all rows j != indices[i], and over those with
    bank_labels[j] == labels[i]. Empty sets give -inf. No gradient flows into the bank.
    Beyond KNN_BLOCK_ELEMENTS pairs the rows are taken in blocks whose logits the backward recomputes
    (one more product, but B x block instead of B x n activations: at 10^7 rows a worker, B x n does not fit).
    """
    dtype = at_least_fp32(z.dtype)                         # whatever the networks ran in
    local = indices - offset
    with torch.autocast(z.device.type, enabled=False):    # (optim.precision bf16)
        zn = F.normalize(z.to(dtype), dim=1)
        if len(z) * bank.shape[0] > KNN_BLOCK_ELEMENTS:
            block = max(1, KNN_BLOCK_ELEMENTS // max(len(z), 1))
            return _BlockwiseLSE.apply(zn, bank.detach(), labels, bank_labels, local, sigma, block)
        logits, keep, same = _block_logits(zn, bank.detach(), labels, bank_labels, local, sigma, 0, bank.shape[0])
    neg_inf = torch.finfo(logits.dtype).min
    lse_all = torch.logsumexp(logits.masked_fill(~keep, neg_inf), dim=1)
    lse_same = torch.logsumexp(logits.masked_fill(~same, neg_inf), dim=1)
    # rows with an empty set: make them exactly -inf so that combining blocks stays exact
    lse_all = lse_all.masked_fill(~keep.any(1), float("-inf"))
    lse_same = lse_same.masked_fill(~same.any(1), float("-inf"))
    return lse_all, lse_same


def _block_logits(zn, bank, labels, bank_labels, local, sigma, start, stop):
    """Logits of the rows [start, stop) of the bank, the mask j != i and the mask of the same class."""
    stop = min(stop, bank.shape[0])
    m = F.normalize(bank[start:stop].to(zn.dtype), dim=1)
    logits = zn @ m.t() / sigma                                              # (B, stop - start)
    keep = torch.ones_like(logits, dtype=torch.bool)
    rows = torch.nonzero((local >= start) & (local < stop)).squeeze(1)
    keep[rows, local[rows] - start] = False                                  # j != i (eq. 2)
    same = keep & (bank_labels[start:stop].view(1, -1) == labels.view(-1, 1))
    return logits, keep, same


class _BlockwiseLSE(torch.autograd.Function):
    """knn_partials block by block: the forward keeps running log-sum-exps, the backward recomputes
    each block's logits; only zn and the two (B,) results are saved."""

    @staticmethod
    def forward(ctx, zn, bank, labels, bank_labels, local, sigma, block):
        lse = zn.new_full((2, len(zn)), float("-inf"))
        for start in range(0, bank.shape[0], block):
            logits, keep, same = _block_logits(zn, bank, labels, bank_labels, local, sigma, start, start + block)
            part = torch.stack([logits.masked_fill(~keep, float("-inf")).logsumexp(1),
                                logits.masked_fill(~same, float("-inf")).logsumexp(1)])
            lse = torch.logaddexp(lse, part)                                 # an empty set stays -inf
        ctx.save_for_backward(zn, bank, labels, bank_labels, local, lse)
        ctx.sigma, ctx.block = sigma, block
        return lse[0], lse[1]

    @staticmethod
    def backward(ctx, g_all, g_same):
        zn, bank, labels, bank_labels, local, lse = ctx.saved_tensors
        finite = torch.isfinite(lse)
        g = torch.where(finite, torch.stack([g_all, g_same]), 0.0)          # an empty set: no gradient
        lse = torch.where(finite, lse, 0.0)
        grad = torch.zeros_like(zn)
        with torch.autocast(zn.device.type, enabled=False):   # as the forward, whoever calls backward()
            for start in range(0, bank.shape[0], ctx.block):
                logits, keep, same = _block_logits(zn, bank, labels, bank_labels, local, ctx.sigma, start,
                                                   start + ctx.block)
                w = ((logits - lse[0, :, None]).exp().masked_fill(~keep, 0) * g[0, :, None]
                     + (logits - lse[1, :, None]).exp().masked_fill(~same, 0) * g[1, :, None])
                grad += w @ F.normalize(bank[start:start + ctx.block].to(zn.dtype), dim=1) / ctx.sigma
        return grad, None, None, None, None, None, None


def knn_terms(lse_all: torch.Tensor, lse_same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query loss -log sum_{same} p_ij = lse_all - lse_same, and the valid-query mask.

    A query whose class has no other row in the memory is invalid: its term is 0.
    """
    valid = torch.isfinite(lse_same)
    zero = torch.zeros_like(lse_all)
    terms = torch.where(valid, lse_all - torch.where(valid, lse_same, zero), zero)
    return terms, valid


def knn_loss(z: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
             bank: torch.Tensor, bank_labels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Eq. 3 averaged over the valid queries: sum_valid l_i / V (0 when V = 0)."""
    lse_all, lse_same = knn_partials(z, labels, indices, bank, bank_labels, sigma)
    terms, valid = knn_terms(lse_all, lse_same)
    return terms.sum() / valid.sum().clamp(min=1)


def instance_loss(predictions: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 1: -sum_{i != j} cos(q(g_theta(t_i x)), g_xi(t_j x)) / (T(T-1)), averaged over the batch."""
    T = len(predictions)
    if T < 2 or len(targets) != T:
        raise ValueError(f"instance_loss needs T >= 2 predictions and as many targets, got {T}, {len(targets)}")
    preds = [F.normalize(p, dim=1) for p in predictions]
    targs = [F.normalize(t.detach(), dim=1) for t in targets]
    total = sum((preds[i] * targs[j]).sum(1) for i in range(T) for j in range(T) if i != j)
    return -(total / (T * (T - 1))).mean()


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the baseline's classifier head."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
