"""Exact average precision from scores, without sorting the N scores of a row (paper §4.1:
category-level retrieval mAP, as sklearn's average_precision_score, ties included), and MAP@R
(Musgrave et al. 2020) from the same counts.

Per query, AP needs, for each of its R relevant items, #relevant and #items scoring at or above
it. The relevant scores are gathered through a label index (O(R), never a Q x N mask), sorted
into thresholds, and every item is counted against them in O(1) per item: O(N + R log R) per
query. On CPU the gather, the count and the AP are compiled loops (grafit_core/ap_kernel.c),
else torch operations (`count_at_or_above_torch`, `_ap_from_counts`: the reference, the same
bits). With a ctx (grafit_core.distributed) the items are one shard of the collection: the
thresholds and the counts are summed over shards. That exchange is O(q x R) per chunk of q
queries, and so are the thresholds and counts each worker holds: the lower bound for exact AP
over a sharded collection (every relevant score must meet every shard's items), O(N) for a query
at a coarse level (R ~ N / C). Rows are therefore taken in groups whose q x R buffers stay within
a quarter of CHUNK_BYTES, the budget that also bounds the q x N/W scores; a group's buffers are
as wide as its own largest R, not the chunk's.
"""
import math

import torch

from grafit_core import ap_kernel

# Per chunk of queries, everything the pass allocates beside the (normalised) embeddings: half for
# the q x N/W scores (metrics.pass_rows), a quarter for the AP's q x R buffers, the rest slack.
CHUNK_BYTES = 128 << 20
PAIR_BYTES = 176          # peak per (query, relevant item), torch: threshold, count, indices, float64 precisions
                          # (AP and MAP@R)
FUSED_PAIR_BYTES = 40     # compiled: threshold, count, and their copies where summed over shards


class LabelIndex:
    """The rows of a collection grouped by label: a query's relevant items are one slice."""

    def __init__(self, labels, num_classes=None):
        labels = torch.as_tensor(labels).long()
        n = max(int(labels.max()) + 1 if labels.numel() else 0, num_classes or 0)
        labels = torch.where(labels < 0, n, labels)     # a negative label is nobody's match: last
        self.order = torch.argsort(labels, stable=True)
        self.size = torch.bincount(labels, minlength=n + 1)[:n]
        self.start = torch.cumsum(self.size, 0) - self.size

    def to(self, device):
        for name in ("order", "size", "start"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def counts(self, query_labels):
        """(q,) #rows with each query's label (0 for a label the collection lacks)."""
        ql = query_labels.long()
        known = (ql >= 0) & (ql < len(self.size))
        return torch.where(known, self.size[torch.where(known, ql, 0)], 0) if len(self.size) else torch.zeros_like(ql)

    def slices(self, query_labels):
        """(start, size): each query's relevant rows are order[start : start + size]."""
        sizes = self.counts(query_labels)
        ql = torch.where(sizes > 0, query_labels.long(), 0)     # a label without rows is never looked up
        return (self.start[ql] if len(self.start) else torch.zeros_like(ql)), sizes

    def pairs(self, query_labels):
        """(rows, cols): every (query, collection row) with the same label, rows ascending."""
        ql, sizes = query_labels.long(), self.counts(query_labels)
        ql = torch.where(sizes > 0, ql, 0)          # a label without rows is never looked up
        rows = torch.repeat_interleave(torch.arange(len(ql), device=ql.device), sizes)
        first = torch.cumsum(sizes, 0) - sizes
        pos = torch.arange(rows.numel(), device=ql.device) - first[rows]
        return rows, (self.order[self.start[ql][rows] + pos] if rows.numel() else rows)


def chunk_ap(scores, query_labels, index, *, ctx=None, ws=None, shift=None, budget=CHUNK_BYTES // 4):
    """(q, 2) float64 [AP, MAP@R] of each row of `scores` (this process's columns of the collection);
    NaN for a query with no relevant item anywhere.

    shift: None, or (logits (q, C), coarse (n,)): rank by scores + logits[row, coarse[item]]
    (eq. 5), added on the fly by the compiled counting loop instead of a q x N tensor.

    With ctx (world_size > 1) each rank holds a shard: rank r writes its relevant scores after
    those of ranks < r into zeros and one all-reduce gives every threshold exactly once
    (x + 0 == x); the counts at or above are summed the same way. Rows go in groups of
    consecutive rows whose buffers, rows x (the group's largest R) pairs of PAIR_BYTES each, fit the
    budget (the same groups on every rank: R is summed over shards first).
    """
    ws, fused = ws or Workspace(), ap_kernel.usable(scores)
    if shift is not None and not fused:     # the torch path needs the ranked scores themselves
        logits, coarse = shift
        shape, dt, dev = scores.shape, scores.dtype, scores.device
        added = torch.gather(logits, 1, coarse.expand(shape), out=ws.get("coarse", shape, dt, dev))
        scores, shift = torch.add(scores, added, out=ws.get("ranked", shape, dt, dev)), None
    n_local = index.counts(query_labels)
    sharded = ctx is not None and ctx.distributed
    counts = ctx.all_gather_cat(n_local[None]) if sharded else n_local[None]     # (W, q) per shard
    n_rel, col_start = counts.sum(dim=0), counts[:ctx.rank if sharded else 0].sum(dim=0)
    groups = _row_groups(n_rel.tolist(), budget // (FUSED_PAIR_BYTES if fused else PAIR_BYTES))
    return torch.cat([_group_ap(scores[a:b], query_labels[a:b], index, n_rel[a:b], col_start[a:b],
                                ctx if sharded else None, ws, fused,
                                None if shift is None else (shift[0][a:b], shift[1]))
                      for a, b in groups] or [torch.empty(0, 2, dtype=torch.float64)])


def _row_groups(n_rel, pairs):
    """[(a, b)]: consecutive rows, as many per group as keep rows x (their largest R) <= pairs (at
    least one row): sized on each group's own R, a query of a large class does not shrink all."""
    groups, a, widest = [], 0, 0
    for i, r in enumerate(n_rel):
        if i > a and (i + 1 - a) * max(widest, r) > pairs:
            groups.append((a, i))
            a, widest = i, 0
        widest = max(widest, r)
    return groups + ([(a, len(n_rel))] if n_rel else [])


def _group_ap(scores, query_labels, index, n_rel, col_start, ctx, ws, fused, shift):
    r_max = int(n_rel.max())
    if r_max == 0:           # the same n_rel on every rank: all skip the remaining collectives
        return torch.full((scores.shape[0], 2), float("nan"), dtype=torch.float64)
    # unsharded, the pads are +inf already; sharded, each rank's zeros add up to the others' scores
    pad = 0.0 if ctx else float("inf")
    if fused and not ctx:   # the same steps, a row range at a time through all of them
        return ap_kernel.group_ap(scores, index.order, *index.slices(query_labels), r_max, shift)
    if fused:
        thr = ap_kernel.gather(scores, index.order, *index.slices(query_labels), col_start, r_max, pad, shift)
    else:
        thr = _gather_torch(scores, query_labels, index, col_start, r_max, pad, shift)
    if ctx:
        thr = ctx.all_reduce_sum(thr)
        pads = torch.arange(r_max, device=thr.device)[None] >= n_rel[:, None]
        thr = thr.masked_fill(pads, float("inf"))
    thr = _sorted_rows(thr)
    n_ge = ap_kernel.count_at_or_above(thr, scores, shift) if fused else count_at_or_above_torch(thr, scores, ws)
    if ctx:
        n_ge = ctx.all_reduce_sum(n_ge)
    return ap_kernel.average_precision(thr, n_rel, n_ge) if fused else _ap_from_counts(thr, n_rel, n_ge)


def _gather_torch(scores, query_labels, index, col_start, r_max, pad, shift):
    """ap_kernel.gather with torch operations: (q, r_max) pad, each row's relevant scores from
    column col_start."""
    rows, cols = index.pairs(query_labels)
    n_local = torch.bincount(rows, minlength=scores.shape[0])
    first = torch.cumsum(n_local, 0) - n_local
    pos = torch.arange(rows.numel(), device=rows.device) - first[rows] + col_start[rows]
    values = torch.take(scores, rows * scores.shape[1] + cols)     # row-major logical index
    if shift is not None:                   # the same float32 add as the loop's
        values = values + shift[0][rows, shift[1][cols]]
    # flat 1-D writes: 2x faster than thr[rows, pos] = ...
    thr = scores.new_full((scores.shape[0], r_max), pad)
    thr.view(-1).index_copy_(0, rows * r_max + pos, values)
    return thr


def _sorted_rows(x):
    """Each row of x (a buffer of its own) sorted ascending (NaN last, as torch.sort): numpy's SIMD
    sort on CPU, in place, ~7x faster than torch's on these short rows."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return ap_kernel.sort_rows(x)
    return x.sort(dim=1).values


class Workspace:
    """Scratch tensors reused from chunk to chunk: a fresh q x N tensor per chunk costs more in
    page faults than the arithmetic done in it."""

    def __init__(self):
        self._bufs = {}

    def get(self, name, shape, dtype, device):
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


def count_at_or_above_torch(thr, scores, ws=None):
    """(q, r_max) long: per row, #items whose score is >= each threshold of thr.

    thr is sorted per row (+inf pads allowed). Each item needs #thresholds <= its
    score (its "slot"); a histogram of slots then gives every count. Instead of a
    binary search per item, the range [min, max] of a row's thresholds is cut into
    uniform bins (the same float ops for items and thresholds, so the bin order never
    contradicts the score order): an item in a bin without threshold takes its slot
    from a per-bin lookup table (one gather), and only the few items sharing a bin
    with a threshold are compared exactly. Exact, ties included; -inf items count
    nowhere. Counts of disjoint item sets add up (the sharded path sums them).
    """
    q, r_max = thr.shape
    slots = _slots(thr, scores, ws or Workspace())
    hist = torch.zeros(q, r_max + 1, dtype=torch.int32, device=scores.device)
    hist.scatter_add_(1, slots, torch.ones(1, dtype=torch.int32, device=scores.device).expand_as(slots))
    return hist.flip(1).cumsum(1).flip(1)[:, 1:].long()


def _slots(thr, scores, ws):
    """(q, n) int64 #finite thresholds <= each score (thr sorted per row, +inf pads)."""
    q, r_max = thr.shape
    dev = scores.device
    finite = torch.isfinite(thr)
    n_thr = finite.sum(dim=1, keepdim=True)
    # enough bins that few items share one with a threshold; the table stays far below q x N
    bins = min(1 << 16, max(1024, 1 << (32 * r_max - 1).bit_length()), max(1024, scores.shape[1] // 4))
    lo = torch.where(n_thr > 0, thr[:, :1], 0.0)                              # the smallest threshold
    hi = torch.where(n_thr > 0, thr.gather(1, (n_thr - 1).clamp(min=0)), 0.0)  # the largest finite one
    inv = bins / (hi - lo).clamp(min=1e-12)
    shift = 1.5 - lo * inv          # bin(lo) = 1: items well below lo land alone in bin 0

    def bin_of(x, out):             # monotone in x (each rounding step is), 0 .. bins + 1
        f = torch.addcmul(shift, x, inv, out=ws.get("f", x.shape, x.dtype, dev)).clamp_(0, bins + 1)
        return out.copy_(f.nan_to_num_(0.0))    # a NaN score counts nowhere (like -inf), never crashes

    # per row and bin: #thresholds in lower bins (the slot of an item alone in that bin), or -1
    # where a threshold shares the bin (those items are resolved exactly below)
    thr_bins = bin_of(thr.clamp(max=torch.finfo(thr.dtype).max), torch.empty(q, r_max, dtype=torch.long, device=dev))
    thr_bins = torch.where(finite, thr_bins, bins + 2)
    per_bin = torch.zeros(q, bins + 3, dtype=torch.long, device=dev)
    per_bin.scatter_add_(1, thr_bins, torch.ones_like(thr_bins))
    below = per_bin.cumsum(1) - per_bin                 # #thresholds in lower bins
    table = below.masked_fill(per_bin > 0, -1)
    item_bins = bin_of(scores, ws.get("bins", scores.shape, torch.long, dev))
    slots = torch.gather(table, 1, item_bins, out=ws.get("slots", scores.shape, torch.long, dev))
    flat = torch.lt(slots, 0, out=ws.get("shared", scores.shape, torch.bool, dev)).view(-1).nonzero().squeeze(1)
    if flat.numel():
        # an item sharing a bin with thresholds t_a <= ... <= t_b (contiguous in the sorted row):
        # one distinct value -> slot = first + count * (s >= t_a); several -> binary search
        rows = flat // scores.shape[1]
        cell = rows * per_bin.shape[1] + item_bins.view(-1)[flat]
        first, count = below.view(-1)[cell], per_bin.view(-1)[cell]
        t_a = thr.reshape(-1)[rows * r_max + first]
        t_b = thr.reshape(-1)[rows * r_max + first + count - 1]
        values = scores.reshape(-1)[flat]
        found = first + count * (values >= t_a)
        several = (t_a != t_b).nonzero().squeeze(1)
        if several.numel():
            found[several] = _searchsorted_rows(thr, rows[several], values[several])
        slots.view(-1)[flat] = found
    return slots


def _searchsorted_rows(thr, rows, values):
    """#thresholds of thr[rows[i]] <= values[i], for a ragged set of (row, value) pairs."""
    per_row = torch.bincount(rows, minlength=thr.shape[0])
    width = int(per_row.max())
    first = torch.cumsum(per_row, 0) - per_row
    pos = torch.arange(rows.numel(), device=rows.device) - first[rows]   # rows come sorted (nonzero)
    packed = values.new_full((thr.shape[0], width), float("inf"))
    packed[rows, pos] = values
    found = torch.searchsorted(thr, packed, right=True)
    return found[rows, pos]


def _ap_from_counts(thr, n_rel, n_ge):
    """(q, 2) float64 [AP, MAP@R]: AP = 1/R * sum over relevant r of #{relevant >= s_r} / #{items >= s_r};
    MAP@R (Musgrave et al. 2020) = the same sum over the relevant r ranked within the first R (rank =
    #{items >= s_r}, ties counted at or above), divided by R.

    thr: sorted relevant scores (+inf pads past n_rel); n_ge from count_at_or_above_torch.
    NaN where a row has no relevant item.
    """
    r_max = thr.shape[1]
    ap = torch.full((thr.shape[0], 2), float("nan"), dtype=torch.float64)
    # #relevant with score >= thr[r] = R - #thresholds strictly below thr[r] (handles ties)
    rel_ge = n_rel.unsqueeze(1) - torch.searchsorted(thr, thr, right=False)
    valid = torch.arange(r_max, device=thr.device).unsqueeze(0) < n_rel.unsqueeze(1)
    rank = n_ge.clamp(min=1)
    prec = torch.where(valid, rel_ge.double() / rank.double(), 0.0)
    prec = torch.stack([prec, torch.where(rank <= n_rel.unsqueeze(1), prec, 0.0)], dim=1)   # (q, 2, r_max)
    has_rel = n_rel > 0
    # summed in threshold order (a CPU cumsum is sequential), as the compiled loop: the same bits,
    # whatever the row's group or width
    total = prec.cumsum(2)[:, :, -1] if r_max else prec.sum(2)
    ap[has_rel.cpu()] = (total[has_rel] / n_rel[has_rel].double()[:, None]).cpu()
    return ap
