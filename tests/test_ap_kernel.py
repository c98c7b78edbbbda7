"""The compiled AP loops (grafit_core/ap_kernel.c: gather, count, AP, top-k) against the torch
reference path."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from grafit_core import ap_kernel
from grafit_core.ap import LabelIndex, _ap_from_counts, _gather_torch, count_at_or_above_torch


def _case(seed, quantised, with_nan):
    g = torch.Generator().manual_seed(seed)
    q, n, r = 1 + seed % 17, 1 + (seed * 389) % 3000, 1 + (seed * 7) % 60
    s = torch.randn(q, n, generator=g)
    if quantised:                                   # many exact ties, thresholds sharing a bin
        s = (s * 4).round() / 4
    s[torch.rand(q, n, generator=g) < 0.01] = float("-inf")          # excluded items
    if with_nan:
        s[torch.rand(q, n, generator=g) < 0.01] = float("nan")
    return s, g, r


def _thresholds(ranked, g, r):
    thr = ranked[:, torch.randint(0, ranked.shape[1], (r,), generator=g)].clone()
    thr[torch.rand(thr.shape, generator=g) < 0.2] = float("inf")       # pads
    thr[~torch.isfinite(thr)] = float("inf")
    return thr.sort(dim=1).values


@pytest.mark.parametrize("seed", range(24))
def test_kernel_counts_equal_the_torch_path(seed):
    assert ap_kernel.kernel() is not None, "the AP kernel did not build (is a C compiler installed?)"
    s, g, r = _case(seed, quantised=seed % 2 == 1, with_nan=seed % 3 == 0)
    thr = _thresholds(s, g, r)
    finite = torch.isfinite(thr)                    # pad columns are never read
    assert torch.equal(ap_kernel.count_at_or_above(thr, s)[finite], count_at_or_above_torch(thr, s)[finite])
    # eq. 5: the loop adds logits[row, coarse[item]] itself; the torch path gets the sums
    logits, coarse = torch.randn(s.shape[0], 5, generator=g), torch.randint(0, 5, (s.shape[1],), generator=g)
    ranked = s + logits[:, coarse]
    thr = _thresholds(ranked, g, r)
    finite = torch.isfinite(thr)
    assert torch.equal(ap_kernel.count_at_or_above(thr, s, (logits, coarse))[finite],
                       count_at_or_above_torch(thr, ranked)[finite])


def test_kernel_hand_worked_and_degenerate_rows():
    s = torch.tensor([[0.5, 0.1, 0.9, 0.5, float("nan"), float("-inf")]])
    thr = torch.tensor([[0.1, 0.5, 0.5, 0.9, float("inf")]])
    # >= 0.1: 4 items, >= 0.5: 3, >= 0.9: 1; NaN and -inf count nowhere
    assert ap_kernel.count_at_or_above(thr, s)[0, :4].tolist() == [4, 3, 3, 1]
    same = torch.full((1, 40), 0.25)                # every threshold in one bin: binary search
    items = torch.linspace(0, 0.5, 1001)[None]
    assert ap_kernel.count_at_or_above(same, items)[0].tolist() == [int((items >= 0.25).sum())] * 40
    none = torch.full((2, 3), float("inf"))         # a row without relevant items
    assert ap_kernel.count_at_or_above(none, torch.randn(2, 9)).sum() == 0


def test_without_the_kernel_the_torch_path_runs(tmp_path):
    code = ("import torch; from grafit_core import ap_kernel; from grafit_core.distributed import DistContext;"
            "from grafit_core.metrics import Ranking, evaluate_pass;"
            "assert ap_kernel.kernel() is None and not ap_kernel.usable(torch.zeros(1, 1));"
            "x, y = torch.eye(3), {'l': torch.arange(3)};"
            "_, aps = evaluate_pass(x, x, 0, y, y, {'l': 3}, DistContext(), votes=set(), ap_levels=['l'],"
            "                       rankings={'r': Ranking()}); print(aps[('r', 'l')][:, 0].mean().item())")
    env = {**os.environ, "GRAFIT_AP_KERNEL": "0", "GRAFIT_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1.0"
    env = {**os.environ, "CC": "/nonexistent/cc", "GRAFIT_CACHE": str(tmp_path)}   # no compiler: a warning
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1.0" and "AP kernel unavailable" in out.stderr


@pytest.mark.parametrize("shifted", [False, True])
def test_kernel_skips_blocks_below_every_threshold_exactly(shifted):
    # thresholds among each row's best scores: most blocks of 16 items lie wholly below them and
    # are skipped for the whole row (a -inf item or a NaN in a skipped block changes nothing)
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 5000, generator=g)
    s[:, ::97] = float("-inf")
    s[:, 5::101] = float("nan")
    logits, coarse = torch.randn(6, 7, generator=g) * 3, torch.randint(0, 7, (5000,), generator=g)
    ranked = s + logits[:, coarse] if shifted else s
    thr = ranked.nan_to_num(float("-inf")).topk(30, dim=1).values.sort(dim=1).values
    got = ap_kernel.count_at_or_above(thr, s, (logits, coarse) if shifted else None)
    assert torch.equal(got, count_at_or_above_torch(thr, ranked))
    assert torch.equal(got[:, -1], (ranked >= thr[:, -1:]).sum(1))       # by hand: the largest threshold


@pytest.mark.parametrize("k", [1, 7, 50])
@pytest.mark.parametrize("compiled", [True, False])
def test_topk_equals_a_stable_sort(k, compiled, monkeypatch):
    # the compiled loop and the torch fallback: torch.topk's values, ordered by (-value, index)
    if not compiled:
        monkeypatch.setattr(ap_kernel, "usable", lambda scores: False)
    g = torch.Generator().manual_seed(k)
    s = torch.randn(9, 3001, generator=g)
    s[1, 17] = float("nan")                          # torch ranks NaN above everything
    s[2, ::3] = float("-inf")
    s[3] = (s[3] * 2).round() / 2                    # ties: equal values, the lower index first
    s[4] = (s[4] > 1).float()                        # a few hundred tied at 1, the rest at 0
    s[5, :] = 0.25                                   # every item tied
    vals, idx = ap_kernel.topk(s, k)
    ref_vals, _ = s.topk(k, dim=1)
    assert torch.equal(vals.nan_to_num(9.0), ref_vals.nan_to_num(9.0))
    assert torch.equal(s.gather(1, idx).nan_to_num(9.0), vals.nan_to_num(9.0))   # indices point at them
    assert all(len(set(row)) == k for row in idx.tolist())
    assert torch.isnan(vals[1, 0]) and idx[1, 0] == 17
    stable = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(idx, stable)
    assert idx[5].tolist() == list(range(k))


def test_kernel_thresholds_a_subnormal_apart():
    # hi - lo subnormal: bins / (hi - lo) overflows; every threshold goes to one searched bin
    tiny = torch.finfo(torch.float32).tiny / 4
    thr = torch.tensor([[0.0, tiny, 2 * tiny, float("inf")]])
    s = torch.tensor([[0.0, tiny, 3 * tiny, -1.0, 1.0]])
    assert ap_kernel.count_at_or_above(thr, s)[0, :3].tolist() == [4, 3, 2]
    assert torch.equal(ap_kernel.count_at_or_above(thr, s)[0, :3], count_at_or_above_torch(thr, s)[0, :3])


def test_kernel_thresholds_too_far_apart_for_a_float_range():
    # hi - lo overflows to +inf: the bin arithmetic gives NaN for the top items, never a cast of it
    thr = torch.tensor([[-1.8e38, 1.8e38]])
    s = torch.tensor([[0.0, 1.0, 1.8e38, -1.8e38, 3e38]])
    assert ap_kernel.count_at_or_above(thr, s).tolist() == [[5, 2]]


def test_kernel_refuses_coarse_labels_outside_the_logits():
    s, thr = torch.randn(2, 6), torch.zeros(2, 1)
    logits = torch.zeros(2, 3)
    for bad in (torch.tensor([0, 1, 2, 0, 1, -1]), torch.tensor([0, 1, 2, 0, 1, 3])):
        with pytest.raises(IndexError, match="coarse label out of range"):
            ap_kernel.count_at_or_above(thr, s, (logits, bad))


@pytest.mark.parametrize("seed", range(6))
def test_kernel_counts_with_many_thresholds(seed):
    # coarse levels: R in the thousands (binned 4 per threshold), crowded bins (quantised scores:
    # more than the 4 thresholds compared at once share a bin, searched), and a shard's row shorter
    # than the thresholds of all shards (the bins capped at 2 per item)
    g = torch.Generator().manual_seed(100 + seed)
    n = (5000, 300, 20000)[seed % 3]
    s = torch.randn(3, n, generator=g)
    if seed % 2:
        s = (s * 64).round() / 64
    s[:, ::53] = float("nan")
    s[:, 7::61] = float("-inf")
    r = (4000, 1500, 9000)[seed % 3]
    thr = torch.randn(3, r, generator=g)
    thr = ((thr * 64).round() / 64 if seed % 2 else thr)
    thr[0, :r // 3] = s[0, torch.randint(0, n, (r // 3,), generator=g)].nan_to_num(0.0)    # exact ties with items
    thr[1, r // 2:] = float("inf")                                                       # pads
    thr[2, :] = thr[2, :1]                                                               # one value, every bin
    thr = thr.sort(dim=1).values
    finite = torch.isfinite(thr)
    assert torch.equal(ap_kernel.count_at_or_above(thr, s)[finite], count_at_or_above_torch(thr, s)[finite])
    logits, coarse = torch.randn(3, 4, generator=g), torch.randint(0, 4, (n,), generator=g)
    ranked = s + logits[:, coarse]
    assert torch.equal(ap_kernel.count_at_or_above(thr, s, (logits, coarse))[finite],
                       count_at_or_above_torch(thr, ranked)[finite])


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("pad", [0.0, float("inf")])
def test_gather_equals_the_torch_path(shifted, pad):
    # labels a row has none of, negative labels (nobody's match), a sharded row's offset among
    # the other shards' relevant items (col_start), NaN and -inf scores copied as they are
    g = torch.Generator().manual_seed(7)
    q, n = 9, 700
    s = torch.randn(q, n, generator=g)
    s[:, ::31] = float("nan")
    s[:, 3::37] = float("-inf")
    labels = torch.randint(-1, 6, (n,), generator=g)
    index = LabelIndex(labels, 8)
    ql = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 2])               # 6, 7: no item
    col_start = torch.randint(0, 50, (q,), generator=g)
    r_max = int((index.counts(ql) + col_start).max()) + 3
    shift = (torch.randn(q, 3, generator=g), torch.randint(0, 3, (n,), generator=g)) if shifted else None
    got = ap_kernel.gather(s, index.order, *index.slices(ql), col_start, r_max, pad, shift)
    ref = _gather_torch(s, ql, index, col_start, r_max, pad, shift)
    assert torch.equal(got.nan_to_num(9.0, 8.0, -8.0), ref.nan_to_num(9.0, 8.0, -8.0))
    with pytest.raises(IndexError):
        ap_kernel.gather(s, index.order, *index.slices(ql), col_start, r_max - 4, pad, shift)


def _ap_case(g, q, r_max, quantised):
    n_rel = torch.randint(0, r_max + 1, (q,), generator=g)
    n_rel[0], n_rel[1] = 0, r_max
    thr = torch.randn(q, r_max, generator=g)
    if quantised:
        thr = (thr * 3).round() / 3                                   # long runs of ties
    thr[2, :5] = float("-inf")
    thr[3, -2:] = float("nan")                                         # a NaN relevant score: sorts last
    thr[torch.arange(r_max)[None] >= n_rel[:, None]] = float("inf")    # pads
    thr = thr.sort(dim=1).values
    n_ge = torch.randint(0, 1 << 40, (q, r_max), generator=g)
    n_ge[4] = 0                                                        # counts of 0 are taken as 1
    return thr, n_rel, n_ge


@pytest.mark.parametrize("r_max,quantised", [(1, False), (40, True), (3000, False), (70000, True)])
def test_average_precision_equals_the_torch_path_bit_for_bit(r_max, quantised):
    g = torch.Generator().manual_seed(r_max)
    thr, n_rel, n_ge = _ap_case(g, 5 if r_max > 1000 else 12, r_max, quantised)
    got, ref = ap_kernel.average_precision(thr, n_rel, n_ge), _ap_from_counts(thr, n_rel, n_ge)
    assert got.dtype == torch.float64 and torch.isnan(got[0]).all()
    np.testing.assert_array_equal(got.numpy(), ref.numpy())          # NaN == NaN, else the same bits


@pytest.mark.parametrize("seed", range(8))
def test_group_ap_equals_the_separate_steps_and_the_torch_path(seed):
    # group_ap (one hand-out of row ranges through gather, sort, count and AP) against the four
    # steps one after another, bit for bit: ties, NaN / -inf / +inf items (a NaN relevant score sorts
    # after the pads), +inf pads (r_max above every row's R), rows of an absent class, eq. 5, R in
    # the thousands; and against the torch path where it is defined (no -inf / +inf items)
    g = torch.Generator().manual_seed(200 + seed)
    q, n, classes = (3, 9, 40)[seed % 3], (20000, 3000, 900)[seed % 3], (3, 2, 9)[seed % 3]
    s = torch.randn(q, n, generator=g)
    if seed % 2:
        s = (s * 8).round() / 8
    if seed % 4 >= 2:
        s[torch.rand(q, n, generator=g) < 0.02] = float("nan")
        s[torch.rand(q, n, generator=g) < 0.02] = float("-inf")
        s[torch.rand(q, n, generator=g) < 0.01] = float("inf")
    labels = torch.randint(-1, classes, (n,), generator=g)
    ql = torch.randint(0, classes + 1, (q,), generator=g)          # classes: no item
    index = LabelIndex(labels, classes + 1)
    start, size = index.slices(ql)
    r_max = int(size.max()) + 3 * (seed % 2)
    shift = (torch.randn(q, 4, generator=g), torch.randint(0, 4, (n,), generator=g)) if seed >= 4 else None
    got = ap_kernel.group_ap(s, index.order, start, size, r_max, shift)
    thr = ap_kernel.sort_rows(ap_kernel.gather(s, index.order, start, size, torch.zeros_like(size), r_max,
                                               float("inf"), shift))
    steps = ap_kernel.average_precision(thr, size, ap_kernel.count_at_or_above(thr, s, shift))
    np.testing.assert_array_equal(got.numpy(), steps.numpy())        # NaN == NaN, else the same bits
    assert torch.isnan(got[ql == classes]).all()
    if seed % 4 < 2:
        ranked = s if shift is None else s + shift[0][:, shift[1]]
        thr = _gather_torch(s, ql, index, torch.zeros_like(size), r_max, float("inf"), shift).sort(dim=1).values
        ref = _ap_from_counts(thr, size, count_at_or_above_torch(thr, ranked))
        np.testing.assert_array_equal(got.numpy(), ref.numpy())
    with pytest.raises(IndexError):
        ap_kernel.group_ap(s, index.order, start, size, int(size.max()) - 1, shift)


def test_openmp_threads_and_the_pool_give_the_same_results(monkeypatch):
    # built with OpenMP, the loops run on torch's threads; without it (or told so here), on the
    # pool of _split_rows: the same row ranges, the same bits
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(37, 4000, generator=g) * 16).round() / 16
    s[:, ::41] = float("nan")
    labels, ql = torch.randint(0, 3, (4000,), generator=g), torch.randint(0, 4, (37,), generator=g)
    index = LabelIndex(labels, 4)
    start, size = index.slices(ql)
    shift = (torch.randn(37, 5, generator=g), torch.randint(0, 5, (4000,), generator=g))

    def results():
        return [*ap_kernel.topk(s, 9), ap_kernel.group_ap(s, index.order, start, size, int(size.max())),
                ap_kernel.group_ap(s, index.order, start, size, int(size.max()), shift)]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        omp = results()
        monkeypatch.setattr(ap_kernel.kernel(), "grafit_openmp", lambda: 0)
        pool = results()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(omp, pool):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
