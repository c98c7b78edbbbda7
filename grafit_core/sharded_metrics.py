"""Exact kNN and retrieval-AP evaluation over a memory bank sharded across W workers.

Worker r holds only the contiguous global rows [start_r, stop_r) of the N x d bank
(`shard_range`); queries are replicated. No worker ever holds the N x d bank or a
Q x N score matrix: per chunk of q queries a worker scores its own q x N/W block and
exchanges O(q * k) (kNN) or O(q * R) (AP, R = #relevant items) values, never O(N).

The results equal the single-process functions of grafit_core.metrics on the
concatenated bank (same float32 scores, same voting and AP counting); with
ctx.world_size == 1 no collective is called and they run the same code path.
Every rank calls the same collectives in the same order and returns the same values.
"""

import math

import torch
import torch.nn.functional as F

from grafit_core import ap_kernel
from grafit_core.ap import LabelIndex, Workspace, chunk_ap
from grafit_core.memory import shard_bounds
from grafit_core.metrics import (FaissFlat, _check_exclude, _coarse_logits, _normalise, _vote, knn_top1,
                                 local_topk, ranked_aps, score_chunks)


# the memory's layout: one definition for training and evaluation
shard_range = shard_bounds


def _global_size(n_local, offset, ctx, device):
    """N of the whole bank; checks that the shards tile [0, N) without gap or overlap.

    Every rank sees the same gathered layout, so a bad layout raises on all ranks
    alike (nobody is left waiting in a collective).
    """
    layout = ctx.all_gather_cat(torch.tensor([[offset, n_local]], dtype=torch.long, device=device))
    layout = sorted(tuple(r) for r in layout.tolist() if r[1] > 0)  # empty shards: any offset
    n = 0
    for start, size in layout:
        if start != n:
            raise ValueError(f"shards do not tile the bank: one starts at {start}, expected {n}")
        n += size
    return n


def _localise(exclude, offset, n_local):
    """Global excluded row per query -> row of this shard, -1 if another shard owns it."""
    if exclude is None:
        return None
    mine = (exclude >= offset) & (exclude < offset + n_local)
    return torch.where(mine, exclude - offset, torch.full_like(exclude, -1))


# --------------------------------------------------------------------------- kNN

def _sharded_knn_scan(query, shard, labels, offset, kmax, chunk_size, exclude, ctx, backend="torch"):
    """Yield (start, top_sims (q, kmax), top_labels (L, q, kmax)) per chunk, as _knn_scan.

    The global top-k is within the union of the shards' local top-k, so merging
    W * kmax candidates with one more topk is exact. Shards shorter than kmax pad
    with -inf sims, which never reach the merged top-k (the bank has >= kmax rows).
    As in the single process, rows tied at the k-th similarity may be picked in
    either order (topk leaves it unspecified).
    """
    if kmax < 1:
        raise ValueError(f"k must be >= 1, got {kmax}")
    dev, n_local = query.device, shard.shape[0]
    n_total = _global_size(n_local, offset, ctx, dev)
    query, shard = _normalise(query), _normalise(shard).to(dev)
    exclude = _check_exclude(exclude, query.shape[0], n_total)
    kmax = min(kmax, n_total - (exclude is not None))
    if kmax < 1:
        raise ValueError("the bank has no row left to vote")
    local_ex = _localise(exclude, offset, n_local)
    lab = torch.stack([x.to(dev).long() for x in labels]) if labels else \
        torch.zeros(0, n_local, dtype=torch.long, device=dev)
    index = FaissFlat(shard) if backend == "faiss" and n_local else None
    k_local = min(kmax, n_local)
    for start in range(0, query.shape[0], chunk_size):
        q = query[start:start + chunk_size]
        if k_local:     # only the owner of an excluded row masks it
            top = local_topk(q, shard, k_local, local_ex, start, backend, index)
        else:
            top = (q.new_zeros(q.shape[0], 0), torch.zeros(q.shape[0], 0, dtype=torch.long, device=dev))
        yield (start, *_merged_topk(*top, lab, kmax, ctx))


def _merged_topk(top_sims, top_idx, lab, kmax, ctx):
    """(top_sims (q, kmax) sorted, top_labels (L, q, kmax)) over all shards from this shard's
    local top-k (q, <= kmax) and labels (L, n_local): gathered, re-ranked. The global top-k is
    within the union of the local ones, so the merge is exact; shards shorter than kmax pad
    with -inf sims, which never reach the merged top-k."""
    k_local = top_sims.shape[1]
    pad = kmax - k_local
    top_sims = F.pad(top_sims, (0, pad), value=float("-inf"))
    top_lab = F.pad(lab[:, top_idx], (0, pad), value=0)  # (L, q, kmax)
    q, width = top_sims.shape[0], ctx.world_size * kmax
    cand_sims = ctx.all_gather_cat(top_sims[None]).permute(1, 0, 2).reshape(q, width)
    cand_lab = ctx.all_gather_cat(top_lab[None]).permute(1, 2, 0, 3).reshape(len(lab), q, width)
    merged, idx = cand_sims.topk(kmax, dim=1)  # sorted: column 0 is the global max
    return merged, cand_lab.gather(2, idx.expand(len(lab), -1, -1))


def sharded_knn_classify(query, shard, shard_labels, offset, k, sigma, num_classes, ctx, *,
                         chunk_size=1024, exclude=None, backend="torch"):
    """(Q, C) kNN probabilities of eq. 6, as knn_classify on the concatenated bank.

    exclude: optional (Q,) GLOBAL bank row to leave out per query (-1 = none).
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    out = torch.empty(query.shape[0], num_classes, device=query.device)
    for start, sims, labs in _sharded_knn_scan(query, shard, [shard_labels], offset, k,
                                               chunk_size, exclude, ctx, backend):
        out[start:start + sims.shape[0]] = _vote(sims, labs[0], k, sigma, num_classes)
    return out


def sharded_knn_predict_multi(query, shard, shard_labels_per_level, offset, ks, sigma, num_classes,
                              ctx, *, chunk_size=1024, exclude=None, backend="torch"):
    """{(level, k): (Q,) predicted labels}, as knn_predict_multi on the concatenated bank."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    levels = list(shard_labels_per_level)
    preds = {(lvl, k): torch.empty(query.shape[0], dtype=torch.long, device=query.device)
             for lvl in levels for k in ks}
    scan = _sharded_knn_scan(query, shard, [shard_labels_per_level[lvl] for lvl in levels], offset,
                             max(ks), chunk_size, exclude, ctx, backend)
    for start, sims, labs in scan:
        for lvl, top_labels in zip(levels, labs):
            for k in ks:
                probs = _vote(sims, top_labels, k, sigma, num_classes[lvl])
                preds[(lvl, k)][start:start + sims.shape[0]] = probs.argmax(dim=1)
    return preds


def sharded_choose_k(shard, labels_per_level, offset, val_indices_global, candidates, sigma,
                     num_classes, ctx, *, chunk_size=1024, backend="torch"):
    """choose_k over the sharded bank: {level: (best_k, {k: top1})}, same on every rank.

    The validation rows live on their owners; a (V, d) all-reduce in which each row is
    written by its owner only (others add exact zeros) replicates them: V x d is small.
    """
    if num_classes is None:
        raise ValueError("num_classes (dict level -> number of classes) is required")
    dev, n_local = shard.device, shard.shape[0]
    val = torch.as_tensor(val_indices_global, dtype=torch.long, device=dev)
    n_total = _global_size(n_local, offset, ctx, dev)
    if val.numel() and (int(val.min()) < 0 or int(val.max()) >= n_total):
        raise ValueError(f"val_indices_global must lie in [0, {n_total})")
    levels = list(labels_per_level)
    rows = replicate_rows(shard.float(), offset, val, ctx)   # _normalise casts to float first anyway
    local_labels = torch.stack([labels_per_level[lvl].to(dev).long() for lvl in levels], dim=1)
    labs = replicate_rows(local_labels, offset, val, ctx).t()
    ks = sorted(set(candidates))
    preds = sharded_knn_predict_multi(rows, shard, labels_per_level, offset, ks, sigma, num_classes,
                                      ctx, chunk_size=chunk_size, exclude=val, backend=backend)
    result = {}
    for i, lvl in enumerate(levels):
        scores = {k: knn_top1(preds[(lvl, k)], labs[i]) for k in ks}
        result[lvl] = (max(ks, key=lambda k: (scores[k], -k)), scores)  # ties -> smallest k
    return result


# ------------------------------------------------------------------ retrieval AP

def replicate_rows(local: torch.Tensor, offset: int, rows: torch.Tensor, ctx) -> torch.Tensor:
    """The global `rows` of a sharded tensor on every rank: each owner writes its rows, the others
    add exact zeros, one all-reduce sums them (len(rows) x ...: meant for small row sets)."""
    out = torch.zeros(len(rows), *local.shape[1:], dtype=local.dtype, device=local.device)
    idx = rows.to(local.device) - offset
    mine = (idx >= 0) & (idx < len(local))
    out[mine] = local[idx[mine]]
    return ctx.all_reduce_sum(out)


def sharded_average_precisions(query, query_labels, shard, shard_labels, offset, ctx, *,
                               shard_coarse=None, query_coarse_probs=None, chunk_size=256,
                               exclude=None):
    """(Q,) float64 APs, as average_precisions on the concatenated collection.

    Relevant = same fine label; NaN for a query with no relevant item on any shard.
    shard_coarse / query_coarse_probs: eq. 5 conditioning (both or neither).
    exclude: optional (Q,) GLOBAL collection row to leave out per query (-1 = none).
    Per chunk, the relevant scores of all shards (O(q x R)) are replicated and sorted into
    thresholds; each shard counts its own items at or above each and the counts are summed
    (grafit_core.ap.chunk_ap). Nothing of size N leaves a worker.
    """
    n_local = shard.shape[0]
    n_total = _global_size(n_local, offset, ctx, query.device)
    local_ex = _localise(_check_exclude(exclude, query.shape[0], n_total), offset, n_local)
    return ranked_aps(query, query_labels, shard, shard_labels, shard_coarse, query_coarse_probs, local_ex,
                      chunk_size, ctx)


def sharded_retrieval_map(query, query_labels, shard, shard_labels, offset, ctx, *,
                          shard_coarse=None, query_coarse_probs=None, chunk_size=256):
    """Mean AP over queries with at least one relevant item in the whole collection."""
    aps = sharded_average_precisions(query, query_labels, shard, shard_labels, offset, ctx,
                                     shard_coarse=shard_coarse,
                                     query_coarse_probs=query_coarse_probs, chunk_size=chunk_size)
    aps = aps[~torch.isnan(aps)]
    return aps.mean().item() if aps.numel() else math.nan


# ------------------------------------------------------------- every metric at once

def pass_rows(n_shard, budget=1 << 25):
    """Queries per chunk: 256, or more while the q x n float32 scores stay within 128 MB (up to
    1024): fewer, larger chunks amortise the per-chunk work that does not scale with n."""
    return max(256, min(1024, budget // max(n_shard, 1)))


def sharded_evaluate_pass(query, shard, offset, shard_labels, query_labels, num_classes, ctx, *, votes,
                          ap_levels, rankings, chunk_size=None):
    """Every evaluation metric from ONE score matrix per chunk of queries, not one pass per metric.

    shard_labels / query_labels: {level: labels}. votes: {(level, k, sigma)} of eq. 6, all from
    one merged top-max(k). rankings: {name: None (cosine) | ("probs", level, (Q, C) p_c) |
    ("knn", level, k, sigma)}: eq. 5 conditioned on a given p_c, or on the eq. 6 votes of the same
    chunk. ap_levels: the levels whose AP is computed under every ranking. chunk_size: queries
    per score matrix (default pass_rows: the same on every rank, as the collectives need).
    Returns ({(level, k, sigma): (Q,) predicted labels}, {(ranking, level): (Q,) float64 AP}).
    """
    dev, n_local = query.device, shard.shape[0]
    n_total = _global_size(n_local, offset, ctx, dev)
    query, shard = _normalise(query), _normalise(shard).to(dev)
    lab = {lv: x.to(dev).long() for lv, x in shard_labels.items()}
    qlab = {lv: x.to(dev).long() for lv, x in query_labels.items()}
    index = {lv: LabelIndex(lab[lv], num_classes[lv]).to(dev) for lv in ap_levels}
    needed = set(votes) | {tuple(r[1:]) for r in rankings.values() if r is not None and r[0] == "knn"}
    if any(s <= 0 for _, _, s in needed):
        raise ValueError("sigma must be > 0")
    vote_levels = sorted({lv for lv, _, _ in needed})
    kmax = min(max((k for _, k, _ in needed), default=0), n_total)
    given = {name: _coarse_logits(r[2].to(dev)) for name, r in rankings.items() if r is not None and r[0] == "probs"}
    preds = {v: torch.empty(query.shape[0], dtype=torch.long, device=dev) for v in votes}
    aps = {(name, lv): [] for name in rankings for lv in ap_levels}
    ws = Workspace()
    stacked = torch.stack([lab[lv] for lv in vote_levels]) if vote_levels else None
    for start, scores in score_chunks(query, shard, chunk_size or pass_rows(-(-n_total // ctx.world_size)), ws):
        stop = start + scores.shape[0]
        probs = {}
        if needed:
            sims, labs = _merged_topk(*ap_kernel.topk(scores, min(kmax, n_local)), stacked, kmax, ctx)
            for lv, k, sigma in needed:
                probs[(lv, k, sigma)] = _vote(sims, labs[vote_levels.index(lv)], min(k, kmax), sigma, num_classes[lv])
            for v in votes:
                preds[v][start:stop] = probs[v].argmax(dim=1)
        for name, r in rankings.items():
            shift = None
            if r is not None:     # eq. 5: + log(p / (1 - p)) of each item's coarse class
                logits = given[name][start:stop] if r[0] == "probs" else _coarse_logits(probs[tuple(r[1:])])
                shift = (logits, lab[r[1]])
            for lv in ap_levels:
                aps[(name, lv)].append(chunk_ap(scores, qlab[lv][start:stop], index[lv], ctx=ctx, ws=ws, shift=shift))
    return preds, {key: torch.cat(v) if v else torch.empty(0, dtype=torch.float64) for key, v in aps.items()}
