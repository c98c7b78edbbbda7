"""Evaluation metrics of Grafit (paper §3.2-3.3, §4.1) in ONE pass over the collection: on-the-fly
kNN classification (eq. 6) and category-level retrieval AP, ranked by cosine or conditioned on
coarse probabilities (eq. 5).

The collection may be sharded across W workers: worker r holds the contiguous global rows
[offset, offset + len(shard)) (grafit_core.memory.shard_bounds); queries are replicated. One
process is W = 1 (ctx = DistContext()): the same code, no collective. Per chunk of q queries a
worker scores its own q x N/W block once and exchanges O(q k) values for kNN (local top-k, then
an exact merge) and O(q R) for AP (R = relevant items of a query, grafit_core.ap). Every rank
calls the same collectives in the same order and returns the same values.

Ties: among equal scores every kNN takes the lower global row first (the C top-k, its torch
fallback and the merge alike), so predictions, and the k chosen from them, never depend on W.
The similarity matmul is float32; AP counting is exact on those float32 scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grafit_core import ap_kernel
from grafit_core.ap import CHUNK_BYTES, LabelIndex, Workspace, chunk_ap

# Clip coarse probabilities so that log(p / (1 - p)) stays finite (a one-hot p
# is the oracle of §3.2: it puts the query's coarse class first).
P_EPS = 1e-6


def normalise(x):
    return F.normalize(x.float(), dim=1)


def _global_size(n_local, offset, ctx, device):
    """N of the whole collection; checks that the shards tile [0, N) without gap or overlap.
    Every rank sees the same gathered layout, so a bad one raises on all ranks alike."""
    layout = ctx.all_gather_cat(torch.tensor([[offset, n_local]], dtype=torch.long, device=device))
    n = 0
    for start, size in sorted(tuple(r) for r in layout.tolist() if r[1] > 0):  # empty shards: any offset
        if start != n:
            raise ValueError(f"shards do not tile the bank: one starts at {start}, expected {n}")
        n += size
    return n


def _check_exclude(exclude, num_queries, num_bank):
    exclude = torch.as_tensor(exclude, dtype=torch.long)
    if exclude.shape != (num_queries,):
        raise ValueError(f"exclude must have shape ({num_queries},), got {tuple(exclude.shape)}")
    if exclude.numel() and int(exclude.max()) >= num_bank:
        raise ValueError(f"exclude holds an index >= bank size {num_bank}")
    return exclude


# --------------------------------------------------------------------- kNN (eq. 6)

class FaissFlat:
    """faiss-cpu's exact inner-product index (IndexFlatIP) over normalised rows: the same
    neighbours as the torch path up to float rounding (its own BLAS blocking). The rows it returns
    are ordered by (-score, index) like every kNN here, but which of several rows tied at the k-th
    score it returns is faiss' choice: the one exception to the tie rule. `pip install faiss-cpu`."""

    def __init__(self, bank):
        import faiss
        faiss.omp_set_num_threads(torch.get_num_threads())   # a Ray worker's share, not every core
        self.index = faiss.IndexFlatIP(bank.shape[1])
        self.index.add(bank.detach().cpu().float().contiguous().numpy())

    def search(self, query, k):
        sims, idx = self.index.search(query.detach().cpu().float().contiguous().numpy(), k)
        sims, idx = torch.from_numpy(sims), torch.from_numpy(idx).long()
        idx, by_index = idx.sort(dim=1)
        sims, order = sims.gather(1, by_index).sort(dim=1, descending=True, stable=True)
        return sims.to(query.device), idx.gather(1, order).to(query.device)


def _local_topk(query, shard, k, exclude, backend, index):
    """(sims, rows) of the k best rows of the shard per normalised query, by (-score, row); the
    excluded row of each query (-1 none) never appears. faiss: one extra neighbour to drop it."""
    if backend == "faiss":
        sims, idx = index.search(query, min(k + (exclude is not None), shard.shape[0]))
        if exclude is not None:
            sims = sims.masked_fill(idx == exclude.to(idx.device)[:, None], float("-inf"))
            sims, pos = sims.sort(dim=1, descending=True, stable=True)
            sims, idx = sims[:, :k], idx.gather(1, pos[:, :k])
        return sims, idx
    sims = query @ shard.T
    if exclude is not None:
        rows = (exclude >= 0).nonzero(as_tuple=True)[0]
        sims[rows, exclude[rows]] = float("-inf")
    return ap_kernel.topk(sims, k)


def _merged_topk(sims, idx, offset, lab, kmax, ctx):
    """(sims (q, kmax), labels (L, q, kmax), global rows (q, kmax)) over all shards, ordered by
    (-score, global row), from this shard's local top-k (q, <= kmax, same order) and labels
    (L, n_local). The global top-k is within the union of the local ones, so the merge is exact;
    shards shorter than kmax pad with -inf, which never reaches it (the bank has >= kmax rows)."""
    rows = idx + offset
    if not ctx.distributed:
        return sims, lab[:, idx], rows
    pad = kmax - sims.shape[1]
    sims = F.pad(sims, (0, pad), value=float("-inf"))
    rows = F.pad(rows, (0, pad), value=1 << 62)     # after every real row
    q, width = sims.shape[0], ctx.world_size * kmax
    cand = [ctx.all_gather_cat(x[None]).permute(1, 0, 2).reshape(q, width) for x in (sims, rows)]
    cand_lab = ctx.all_gather_cat(F.pad(lab[:, idx], (0, pad))[None]).permute(1, 2, 0, 3).reshape(len(lab), q, width)
    rows, by_row = cand[1].sort(dim=1)          # then a stable sort by score: ties by global row
    sims, order = cand[0].gather(1, by_row).sort(dim=1, descending=True, stable=True)
    pick = by_row.gather(1, order[:, :kmax])
    return sims[:, :kmax], cand_lab.gather(2, pick.expand(len(lab), -1, -1)), rows.gather(1, order[:, :kmax])


def knn_neighbours(query, shard, labels, offset, kmax, ctx, *, chunk_size=1024, exclude=None, backend="torch"):
    """Yield (start, sims (q, kmax), labels (L, q, kmax), global rows (q, kmax)) per chunk of
    queries: the kmax nearest rows of the whole collection by cosine, by (-score, global row).
    labels: L label tensors of the shard's rows. exclude: (Q,) GLOBAL row to leave out per query
    (-1 none; leave-one-out). kmax is clamped to the rows there are."""
    if kmax < 1:
        raise ValueError(f"k must be >= 1, got {kmax}")
    dev, n_local = query.device, shard.shape[0]
    n_total = _global_size(n_local, offset, ctx, dev)
    query, shard = normalise(query), normalise(shard).to(dev)
    if exclude is not None:     # only the owner of an excluded row masks it
        exclude = _check_exclude(exclude, query.shape[0], n_total).to(dev)
        exclude = torch.where((exclude >= offset) & (exclude < offset + n_local), exclude - offset, -1)
    kmax = min(kmax, n_total - (exclude is not None))
    if kmax < 1:
        raise ValueError("the bank has no row left to vote")
    lab = torch.stack([x.to(dev).long() for x in labels]) if labels else torch.zeros(0, n_local, dtype=torch.long,
                                                                                      device=dev)
    index = FaissFlat(shard) if backend == "faiss" and n_local else None
    k_local = min(kmax, n_local)
    for start in range(0, query.shape[0], chunk_size):
        q = query[start:start + chunk_size]
        if k_local:
            top = _local_topk(q, shard, k_local, None if exclude is None else exclude[start:start + len(q)],
                              backend, index)
        else:
            top = (q.new_zeros(q.shape[0], 0), torch.zeros(q.shape[0], 0, dtype=torch.long, device=dev))
        yield (start, *_merged_topk(*top, offset, lab, kmax, ctx))


def vote(top_sims, top_labels, k, sigma, num_classes):
    """(q, C) class probabilities of eq. 6 from the k first neighbours, weights exp(cos / sigma).
    Subtracting the row max before exp changes no ratio but avoids overflow at small sigma
    (sigma = 0.05 gives exp(20) otherwise)."""
    weights = torch.exp((top_sims[:, :k] - top_sims[:, :1]) / sigma)
    probs = torch.zeros(top_sims.shape[0], num_classes, device=top_sims.device)
    probs.scatter_add_(1, top_labels[:, :k], weights)
    return probs / probs.sum(dim=1, keepdim=True)


def knn_predict(query, shard, labels_per_level, offset, ks, sigma, num_classes, ctx, *, chunk_size=1024,
                exclude=None, backend="torch"):
    """{(level, k): (Q,) predicted labels} of eq. 6 from ONE merged top-max(ks): the neighbours of
    a smaller k are its prefix. exclude: (Q,) GLOBAL row to leave out per query (-1 none)."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    levels = list(labels_per_level)
    preds = {(lv, k): torch.empty(query.shape[0], dtype=torch.long, device=query.device) for lv in levels for k in ks}
    for start, sims, labs, _ in knn_neighbours(query, shard, [labels_per_level[lv] for lv in levels], offset, max(ks),
                                               ctx, chunk_size=chunk_size, exclude=exclude, backend=backend):
        for lv, top_labels in zip(levels, labs):
            for k in ks:
                preds[(lv, k)][start:start + sims.shape[0]] = vote(sims, top_labels, k, sigma,
                                                                   num_classes[lv]).argmax(dim=1)
    return preds


def replicate_rows(local: torch.Tensor, offset: int, rows: torch.Tensor, ctx) -> torch.Tensor:
    """The global `rows` of a sharded tensor on every rank: each owner writes its rows, the others
    add exact zeros, one all-reduce sums them (len(rows) x ...: meant for small row sets)."""
    out = torch.zeros(len(rows), *local.shape[1:], dtype=local.dtype, device=local.device)
    idx = rows.to(local.device) - offset
    mine = (idx >= 0) & (idx < len(local))
    out[mine] = local[idx[mine]]
    return ctx.all_reduce_sum(out)


def choose_k(shard, labels_per_level, offset, val_indices, candidates, sigma, num_classes, ctx, *,
             chunk_size=1024, backend="torch"):
    """Per level, the k of `candidates` with the best leave-one-out top-1 on the GLOBAL rows
    val_indices (each queries the whole collection minus itself); ties go to the smallest k.
    Returns {level: (best_k, {k: top1})}, the same on every rank."""
    dev = shard.device
    val = torch.as_tensor(val_indices, dtype=torch.long, device=dev)
    n_total = _global_size(shard.shape[0], offset, ctx, dev)
    if val.numel() and (int(val.min()) < 0 or int(val.max()) >= n_total):
        raise ValueError(f"val_indices must lie in [0, {n_total})")
    levels = list(labels_per_level)
    rows = replicate_rows(shard.float(), offset, val, ctx)
    labs = replicate_rows(torch.stack([labels_per_level[lv].to(dev).long() for lv in levels], dim=1), offset, val, ctx)
    ks = sorted(set(candidates))
    preds = knn_predict(rows, shard, labels_per_level, offset, ks, sigma, num_classes, ctx, chunk_size=chunk_size,
                        exclude=val, backend=backend)
    result = {}
    for i, lv in enumerate(levels):
        top1 = {k: (preds[(lv, k)].cpu() == labs[:, i].cpu()).double().mean().item() if len(val) else float("nan")
                for k in ks}
        result[lv] = (max(ks, key=lambda k: (top1[k], -k)), top1)
    return result


# ------------------------------------------------------------ every metric at once

@dataclass(eq=False)
class Ranking:
    """How queries rank the collection for AP: by cosine (level None), or by eq. 5, cosine +
    log(p / (1 - p)) of each item's class at `level`, with p_c given (`probs`, (Q, C): a head's
    softmax, or one-hot for the oracle) or from the pass's own eq. 6 votes with (k, sigma)."""
    level: str | None = None
    probs: torch.Tensor | None = None
    k: int | None = None
    sigma: float | None = None

    @property
    def vote(self):
        return None if self.k is None else (self.level, self.k, self.sigma)


def _coarse_logits(probs):
    p = probs.double().clamp(P_EPS, 1 - P_EPS)
    return (torch.log(p) - torch.log1p(-p)).float()


def pass_rows(n_shard, budget=CHUNK_BYTES // 2):
    """Queries per chunk: as many as keep the q x n float32 scores within half the chunk budget
    (grafit_core.ap.CHUNK_BYTES), up to 1024 (fewer, larger chunks amortise the per-chunk work
    that does not scale with n)."""
    return max(1, min(1024, budget // (4 * max(n_shard, 1))))


def evaluate_pass(query, shard, offset, shard_labels, query_labels, num_classes, ctx, *, votes, ap_levels,
                  rankings, chunk_size=None):
    """Every evaluation metric from ONE score matrix per chunk of queries, not one pass per metric.

    shard_labels / query_labels: {level: labels}. votes: {(level, k, sigma)} of eq. 6, all from
    one merged top-max(k). rankings: {name: Ranking}. ap_levels: the levels whose AP is computed
    under every ranking. chunk_size: queries per score matrix (default pass_rows: the same on every
    rank, as the collectives need).
    Returns ({(level, k, sigma): (Q,) predicted labels}, {(ranking, level): (Q, 2) float64 [AP, MAP@R]}).
    """
    dev, n_local = query.device, shard.shape[0]
    n_total = _global_size(n_local, offset, ctx, dev)
    query, shard = normalise(query), normalise(shard).to(dev)
    lab = {lv: x.to(dev).long() for lv, x in shard_labels.items()}
    qlab = {lv: x.to(dev).long() for lv, x in query_labels.items()}
    index = {lv: LabelIndex(lab[lv], num_classes[lv]).to(dev) for lv in ap_levels}
    needed = set(votes) | {r.vote for r in rankings.values() if r.vote}
    if any(s <= 0 for _, _, s in needed):
        raise ValueError("sigma must be > 0")
    vote_levels = sorted({lv for lv, _, _ in needed})
    kmax = min(max((k for _, k, _ in needed), default=0), n_total)
    given = {name: _coarse_logits(r.probs.to(dev)) for name, r in rankings.items() if r.probs is not None}
    preds = {v: torch.empty(query.shape[0], dtype=torch.long, device=dev) for v in votes}
    aps = {(name, lv): [] for name in rankings for lv in ap_levels}
    ws = Workspace()
    stacked = torch.stack([lab[lv] for lv in vote_levels]) if vote_levels else None
    chunk_size = chunk_size or pass_rows(-(-n_total // ctx.world_size))
    for start in range(0, query.shape[0], chunk_size):
        q = query[start:start + chunk_size]
        stop = start + q.shape[0]
        scores = torch.mm(q, shard.T, out=ws.get("scores", (q.shape[0], n_local), torch.float32, dev))
        probs = {}
        if needed:
            sims, labs, _ = _merged_topk(*ap_kernel.topk(scores, min(kmax, n_local)), offset, stacked, kmax, ctx)
            for lv, k, sigma in needed:
                probs[(lv, k, sigma)] = vote(sims, labs[vote_levels.index(lv)], min(k, kmax), sigma, num_classes[lv])
            for v in votes:
                preds[v][start:stop] = probs[v].argmax(dim=1)
        for name, r in rankings.items():
            shift = None
            if r.level is not None:     # eq. 5: + log(p / (1 - p)) of each item's coarse class
                logits = given[name][start:stop] if r.probs is not None else _coarse_logits(probs[r.vote])
                shift = (logits, lab[r.level])
            for lv in ap_levels:
                aps[(name, lv)].append(chunk_ap(scores, qlab[lv][start:stop], index[lv], ctx=ctx, ws=ws, shift=shift))
    return preds, {key: torch.cat(v) if v else torch.empty(0, 2, dtype=torch.float64) for key, v in aps.items()}
