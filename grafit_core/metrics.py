"""Evaluation metrics of Grafit: on-the-fly kNN classification (eq. 6) and
category-level retrieval AP, plain or conditioned by coarse predictions (eq. 5).

Everything works in chunks of queries so that memory stays O(chunk x N); the
similarity matmul is float32, the AP counting is exact on those float32 scores.
"""

import math

import torch
import torch.nn.functional as F

from grafit_core import ap_kernel
from grafit_core.ap import LabelIndex, Workspace, _ap_from_counts, _count_at_or_above, chunk_ap

# Clip coarse probabilities so that log(p / (1 - p)) stays finite (a one-hot p
# is the oracle of §3.2: it puts the query's coarse class first).
_P_EPS = 1e-6


def _normalise(x):
    return F.normalize(x.float(), dim=1)


def _check_exclude(exclude, num_queries, num_bank):
    if exclude is None:
        return None
    exclude = torch.as_tensor(exclude, dtype=torch.long)
    if exclude.shape != (num_queries,):
        raise ValueError(f"exclude must have shape ({num_queries},), got {tuple(exclude.shape)}")
    if exclude.numel() and int(exclude.max()) >= num_bank:
        raise ValueError(f"exclude holds an index >= bank size {num_bank}")
    return exclude


def _mask_excluded(scores, exclude, start):
    """Set scores[i, exclude[start + i]] = -inf (leave-one-out); -1 means none."""
    if exclude is None:
        return
    ex = exclude[start:start + scores.shape[0]].to(scores.device)
    rows = (ex >= 0).nonzero(as_tuple=True)[0]
    scores[rows, ex[rows]] = float("-inf")


# --------------------------------------------------------------------- kNN (eq. 6)

KNN_BACKENDS = ("torch", "faiss")


class FaissFlat:
    """faiss-cpu's exact inner-product index (IndexFlatIP) over normalised rows: the same
    neighbours as the torch path up to float rounding (its own BLAS blocking; ties may order
    differently). Optional: `pip install faiss-cpu`."""

    def __init__(self, bank):
        import faiss
        faiss.omp_set_num_threads(torch.get_num_threads())   # a Ray worker's share, not every core
        self.index = faiss.IndexFlatIP(bank.shape[1])
        self.index.add(bank.detach().cpu().float().contiguous().numpy())

    def search(self, query, k):
        sims, idx = self.index.search(query.detach().cpu().float().contiguous().numpy(), k)
        return torch.from_numpy(sims).to(query.device), torch.from_numpy(idx).long().to(query.device)


def local_topk(query, bank, k, exclude, start, backend, index=None):
    """(sims, idx) of the k best rows of `bank` per (normalised) query row, decreasing; exclude
    (an index into bank per query, -1 none) never appears. torch: one matmul + topk, the exact
    reference; faiss: `index` (a FaissFlat of bank), one extra neighbour to drop the excluded."""
    if backend == "faiss":
        extra = int(exclude is not None)
        sims, idx = index.search(query, min(k + extra, bank.shape[0]))
        if extra:
            ex = exclude[start:start + query.shape[0]].to(idx.device)
            sims = sims.masked_fill(idx == ex[:, None], float("-inf"))
            sims, pos = sims.topk(min(k, sims.shape[1]), dim=1)
            idx = idx.gather(1, pos)
        return sims, idx
    sims = query @ bank.T
    _mask_excluded(sims, exclude, start)
    return ap_kernel.topk(sims, k)


def _knn_scan(query, bank, kmax, chunk_size, exclude, backend="torch"):
    """Yield (start, top_sims, top_idx) per chunk: one matmul and one topk each (or one faiss
    search). top_sims is sorted in decreasing order, so column 0 is the row maximum.
    """
    if kmax < 1:
        raise ValueError(f"k must be >= 1, got {kmax}")
    query, bank = _normalise(query), _normalise(bank).to(query.device)
    exclude = _check_exclude(exclude, query.shape[0], bank.shape[0])
    kmax = min(kmax, bank.shape[0] - (exclude is not None))
    if kmax < 1:
        raise ValueError("the bank has no row left to vote")
    index = FaissFlat(bank) if backend == "faiss" else None
    for start in range(0, query.shape[0], chunk_size):
        yield start, *local_topk(query[start:start + chunk_size], bank, kmax, exclude, start, backend, index)


def _vote(top_sims, top_labels, k, sigma, num_classes):
    """Class probabilities from the k first neighbours, weights exp(cos / sigma).

    Subtracting the row max before exp changes no ratio but avoids overflow
    at small sigma (sigma = 0.05 gives exp(20) otherwise).
    """
    weights = torch.exp((top_sims[:, :k] - top_sims[:, :1]) / sigma)
    probs = torch.zeros(top_sims.shape[0], num_classes, device=top_sims.device)
    probs.scatter_add_(1, top_labels[:, :k], weights)
    return probs / probs.sum(dim=1, keepdim=True)


def knn_classify(query, bank, bank_labels, k, sigma, num_classes, *, chunk_size=1024, exclude=None,
                 backend="torch"):
    """(Q, C) float32 kNN class probabilities of eq. 6 (cosine top-k, exp(cos/sigma) votes).

    exclude: optional (Q,) long bank row to leave out per query (-1 = none).
    k larger than the bank is clamped to the bank size.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    bank_labels = bank_labels.to(query.device).long()
    out = torch.empty(query.shape[0], num_classes, device=query.device)
    for start, top_sims, top_idx in _knn_scan(query, bank, k, chunk_size, exclude, backend):
        probs = _vote(top_sims, bank_labels[top_idx], k, sigma, num_classes)
        out[start:start + probs.shape[0]] = probs
    return out


def knn_predict_multi(query, bank, labels_per_level, ks, sigma, num_classes, *, chunk_size=1024,
                      exclude=None, backend="torch"):
    """{(level, k): (Q,) predicted labels} from ONE similarity pass and ONE topk(max(ks)).

    The neighbours of a smaller k are a prefix of those of max(ks), so every
    (level, k) is derived from the same sorted top-k.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    labels = {lvl: lab.to(query.device).long() for lvl, lab in labels_per_level.items()}
    preds = {(lvl, k): torch.empty(query.shape[0], dtype=torch.long, device=query.device)
             for lvl in labels for k in ks}
    for start, top_sims, top_idx in _knn_scan(query, bank, max(ks), chunk_size, exclude, backend):
        stop = start + top_sims.shape[0]
        for lvl, lab in labels.items():
            top_labels = lab[top_idx]
            for k in ks:
                probs = _vote(top_sims, top_labels, k, sigma, num_classes[lvl])
                preds[(lvl, k)][start:stop] = probs.argmax(dim=1)
    return preds


def knn_top1(probs_or_pred, labels):
    """Top-1 accuracy (fraction in [0, 1]) from (Q, C) probabilities or (Q,) predictions."""
    pred = probs_or_pred.argmax(dim=1) if probs_or_pred.dim() == 2 else probs_or_pred
    if pred.numel() == 0:
        return float("nan")
    return (pred.cpu() == labels.cpu()).double().mean().item()


def choose_k(bank, labels_per_level, val_indices, candidates=(10, 15, 20, 25, 30), sigma=0.05,
             num_classes=None, *, chunk_size=1024, backend="torch"):
    """Per level, the k of `candidates` with the best leave-one-out top-1 on val_indices.

    Each validation row queries the whole bank minus itself. Ties go to the
    smallest k. Returns {level: (best_k, {k: top1})}.
    """
    if num_classes is None:
        raise ValueError("num_classes (dict level -> number of classes) is required")
    val_indices = torch.as_tensor(val_indices, dtype=torch.long)
    ks = sorted(set(candidates))
    preds = knn_predict_multi(bank[val_indices], bank, labels_per_level, ks, sigma, num_classes,
                              chunk_size=chunk_size, exclude=val_indices, backend=backend)
    result = {}
    for lvl, lab in labels_per_level.items():
        scores = {k: knn_top1(preds[(lvl, k)], lab[val_indices]) for k in ks}
        best = max(ks, key=lambda k: (scores[k], -k))  # sorted ks: ties -> smallest k
        result[lvl] = (best, scores)
    return result


# ------------------------------------------------------------ retrieval AP (eq. 5)

def _pack_relevant(scores, relevant, width, fill, col_start=None):
    """(q, width) matrix of each row's relevant scores, in columns col_start[i] + 0, 1, ...

    Other cells hold `fill`. col_start lets several shards write disjoint column
    ranges of the same row (the sharded path sums their matrices).
    """
    n_rel = relevant.sum(dim=1)
    rows, cols = relevant.nonzero(as_tuple=True)  # row-major order
    first = torch.cumsum(n_rel, 0) - n_rel
    pos = torch.arange(rows.numel(), device=rows.device) - first[rows]
    if col_start is not None:
        pos = pos + col_start[rows]
    out = scores.new_full((scores.shape[0], width), fill)
    out[rows, pos] = scores[rows, cols]
    return out


def _ap_from_scores(scores, relevant):
    """Exact per-row non-interpolated AP (as sklearn's average_precision_score).

    Sorts only the R relevant scores of a row (thresholds), then counts the
    items at or above each. Relevant scores must be finite; -inf items
    (excluded) count nowhere.
    """
    n_rel = relevant.sum(dim=1)
    r_max = int(n_rel.max()) if scores.shape[0] else 0
    if r_max == 0:
        return torch.full((scores.shape[0],), float("nan"), dtype=torch.float64)
    # +inf pads sort last and are never <= a finite score.
    thr = _pack_relevant(scores, relevant, r_max, float("inf")).sort(dim=1).values
    return _ap_from_counts(thr, n_rel, _count_at_or_above(thr, scores))


def _coarse_logits(query_coarse_probs):
    p = query_coarse_probs.double().clamp(_P_EPS, 1 - _P_EPS)
    return (torch.log(p) - torch.log1p(-p)).float()


def score_chunks(query, collection, chunk_size, ws, *, exclude=None):
    """Per chunk of (normalised) queries: (start, float32 scores against `collection`, a whole
    collection or one shard); each query's `exclude` row (an index into `collection`, -1 none)
    scores -inf. The scores live in a workspace buffer, valid until the next chunk."""
    dev = query.device
    for start in range(0, query.shape[0], chunk_size):
        q = query[start:start + chunk_size]
        scores = torch.mm(q, collection.T, out=ws.get("scores", (q.shape[0], collection.shape[0]), torch.float32, dev))
        _mask_excluded(scores, exclude, start)
        yield start, scores


def average_precisions(query, query_labels, collection, collection_labels, *, collection_coarse=None,
                       query_coarse_probs=None, chunk_size=256, exclude=None):
    """(Q,) float64 AP of each query ranking the collection; NaN if nothing is relevant.

    Relevant = same (fine) label. Score = cosine, plus log(p / (1 - p)) with
    p = query_coarse_probs[q, collection_coarse[n]] when both are given (eq. 5).
    exclude: optional (Q,) long collection row to leave out per query (-1 = none).
    """
    exclude = _check_exclude(exclude, query.shape[0], collection.shape[0])
    return ranked_aps(query, query_labels, collection, collection_labels, collection_coarse, query_coarse_probs,
                      exclude, chunk_size, None)


def ranked_aps(query, query_labels, collection, collection_labels, collection_coarse, query_coarse_probs,
               exclude, chunk_size, ctx):
    """average_precisions on this process's collection rows (all of them, or one shard with ctx)."""
    if (collection_coarse is None) != (query_coarse_probs is None):
        raise ValueError("give both coarse labels and query_coarse_probs, or neither")
    dev = query.device
    query, collection = _normalise(query), _normalise(collection).to(dev)
    index, labels, ws = LabelIndex(collection_labels).to(dev), query_labels.to(dev), Workspace()
    logits = None if query_coarse_probs is None else _coarse_logits(query_coarse_probs.to(dev))
    coarse = None if collection_coarse is None else collection_coarse.to(dev).long()
    aps = [chunk_ap(scores, labels[start:start + len(scores)], index, ctx=ctx, ws=ws,
                    exclude=None if exclude is None else exclude[start:start + len(scores)],
                    shift=None if logits is None else (logits[start:start + len(scores)], coarse))
           for start, scores in score_chunks(query, collection, chunk_size, ws, exclude=exclude)]
    return torch.cat(aps) if aps else torch.empty(0, dtype=torch.float64)


def retrieval_map(query, query_labels, collection, collection_labels, *, collection_coarse=None,
                  query_coarse_probs=None, chunk_size=256):
    """Mean AP over queries that have at least one relevant item in the collection."""
    aps = average_precisions(query, query_labels, collection, collection_labels,
                             collection_coarse=collection_coarse,
                             query_coarse_probs=query_coarse_probs, chunk_size=chunk_size)
    aps = aps[~torch.isnan(aps)]
    return aps.mean().item() if aps.numel() else math.nan
