"""Oracles: each evaluation metric computed on its own, the obvious way, for the tests to hold
grafit_core.metrics' one pass against (beside hand-worked values and sklearn). The whole
collection in one process, one float32 score matrix, a stable sort of each row: no chunking, no
sharding, no compiled loop. Among equal scores the lower row comes first (the rule of every kNN)."""
import math

import numpy as np
import torch
import torch.nn.functional as F


def scores(query, bank, exclude=None):
    """(Q, N) float32 cosines; each query's `exclude` row (-1 none) scores -inf."""
    s = F.normalize(query.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    if exclude is not None:
        rows = (exclude >= 0).nonzero(as_tuple=True)[0]
        s[rows, exclude[rows]] = float("-inf")
    return s


def neighbours(query, bank, k, exclude=None):
    """(sims, rows) of the k nearest rows, ordered by (-score, row): a stable sort of the whole row."""
    s = scores(query, bank, exclude)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), order


def knn_predict(query, bank, bank_labels, k, sigma, num_classes, exclude=None):
    """(Q,) eq. 6 predictions: exp((cos - max cos) / sigma) summed per class in float32, neighbour by
    neighbour in the stable order; the first class of equal sums wins."""
    sims, rows = neighbours(query, bank, min(k, bank.shape[0] - (exclude is not None)), exclude)
    out = []
    for s, r in zip(sims, rows):
        sums = torch.zeros(num_classes)
        for j in range(len(r)):
            sums[bank_labels[r[j]]] += torch.exp((s[j] - s[0]) / sigma)
        out.append(int(torch.argmax(sums)))
    return torch.tensor(out, dtype=torch.long)


def choose_k(bank, labels_per_level, val, candidates, sigma, num_classes):
    """{level: (best k, {k: leave-one-out top-1})}, ties to the smallest k."""
    out = {}
    for lv, lab in labels_per_level.items():
        top1 = {k: float((knn_predict(bank[val], bank, lab, k, sigma, num_classes[lv], exclude=val) == lab[val])
                         .double().mean()) for k in sorted(set(candidates))}
        out[lv] = (min(top1, key=lambda k: (-top1[k], k)), top1)
    return out


def ranked_scores(query, coll, coarse=None, probs=None):
    """Cosine, or eq. 5: cosine + log(p / (1 - p)) of each item's coarse class, p clipped to
    [1e-6, 1 - 1e-6], added in float32 (the ranking the metric is defined on)."""
    s = scores(query, coll)
    if probs is None:
        return s
    p = probs.double().clamp(1e-6, 1 - 1e-6)
    return s + (torch.log(p) - torch.log1p(-p)).float()[:, coarse]


def average_precisions(query, query_labels, coll, coll_labels, coarse=None, probs=None):
    """(Q,) sklearn's average_precision_score per query; NaN for a query without a relevant item."""
    from sklearn.metrics import average_precision_score      # here: gloo workers skip its import
    s = ranked_scores(query, coll, coarse, probs).double().numpy()
    rel = (query_labels[:, None] == coll_labels[None, :]).numpy()
    return torch.tensor([average_precision_score(rel[i], s[i]) if rel[i].any() else np.nan for i in range(len(s))],
                        dtype=torch.float64)


def map_at_r(scores, relevant):
    """(Q,) MAP@R by brute force: for each relevant item, its rank = #items scoring at or above it;
    those ranked within R add #relevant at or above / rank; the sum over R. NaN without a relevant item."""
    s, rel = np.asarray(scores, dtype=np.float64), np.asarray(relevant, dtype=bool)
    out = []
    for row, r in zip(s, rel):
        total = 0.0
        for j in np.nonzero(r)[0]:
            above = row >= row[j]
            if above.sum() <= r.sum():
                total += (above & r).sum() / above.sum()
        out.append(total / r.sum() if r.any() else np.nan)
    return np.array(out)


def retrieval_map(aps):
    aps = aps[~torch.isnan(aps)]
    return aps.mean().item() if aps.numel() else math.nan
