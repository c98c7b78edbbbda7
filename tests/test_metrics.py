"""The one-pass evaluation (grafit_core.metrics) in one process against hand-worked values,
float64 Python loops, sklearn and the oracles of tests/oracles.py."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

import oracles
from grafit_core import ap_kernel
from grafit_core.ap import FUSED_PAIR_BYTES, PAIR_BYTES, LabelIndex, chunk_ap
from grafit_core.distributed import DistContext
from grafit_core.metrics import Ranking, choose_k, evaluate_pass, knn_neighbours, knn_predict, normalise, vote

CTX = DistContext()


def knn_probs(query, bank, labels, k, sigma, num_classes, *, chunk_size=1024, exclude=None, backend="torch"):
    """(Q, C) eq. 6 probabilities from the pass's own neighbours and votes."""
    return torch.cat([vote(sims, labs[0], k, sigma, num_classes) for _, sims, labs, _ in knn_neighbours(
        query, bank, [labels], 0, k, CTX, chunk_size=chunk_size, exclude=exclude, backend=backend)])


def average_precisions(query, query_labels, coll, coll_labels, *, coarse=None, probs=None, chunk_size=None):
    """(Q,) APs of the one pass, cosine or eq. 5 with the given p_c."""
    labels, nc = {"fine": coll_labels}, {"fine": int(max(coll_labels.max(), query_labels.max())) + 1}
    ranking = Ranking()
    if probs is not None:
        labels["coarse"], nc["coarse"], ranking = coarse, probs.shape[1], Ranking("coarse", probs=probs)
    _, aps = evaluate_pass(query, coll, 0, labels, {"fine": query_labels}, nc, CTX, votes=set(), ap_levels=["fine"],
                           rankings={"r": ranking}, chunk_size=chunk_size)
    return aps[("r", "fine")][:, 0]


def _data(seed, q=40, n=300, d=16, classes=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(q, d, generator=g), torch.randint(0, classes, (q,), generator=g),
            torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g))


def _cos64(a, b):
    """float64 cosine similarity matrix, row by row in numpy."""
    a, b = a.double().numpy(), b.double().numpy()
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.array([[float(np.dot(x, y)) for y in b] for x in a])


def _knn_reference(query, bank, bank_labels, k, sigma, num_classes):
    """Eq. 6 per query in float64: argsort, then loop over the k neighbours."""
    cos = _cos64(query, bank)
    out = np.zeros((len(query), num_classes))
    for i in range(len(query)):
        for j in np.argsort(-cos[i])[:k]:
            out[i, int(bank_labels[j])] += math.exp(cos[i, j] / sigma)
        out[i] /= out[i].sum()
    return out


# ------------------------------------------------------------------------ kNN

@pytest.mark.parametrize("sigma,k,expected", [
    (1.0, 2, [0.6224593312018545, 0.3775406687981454]),
    (1.0, 3, [0.506480391055654, 0.49351960894434593]),
    (0.1, 2, [0.9933071490757152, 0.0066928509242848554]),
    (0.1, 3, [0.9932623568421743, 0.006737643157825641]),
])
def test_knn_hand_worked(sigma, k, expected):
    # Bank at angles 0, 60, 90, 180 deg (cos 1, .5, 0, -1 with the query at 0 deg),
    # labels 0, 1, 1, 0; rows scaled by 3 to check normalisation happens inside.
    # k=2: p0 = e^(1/s) / (e^(1/s) + e^(.5/s)); k=3 adds e^0 to class 1.
    a = math.radians(60)
    bank = 3 * torch.tensor([[1.0, 0.0], [math.cos(a), math.sin(a)], [0.0, 1.0], [-1.0, 0.0]])
    probs = knn_probs(torch.tensor([[2.0, 0.0]]), bank, torch.tensor([0, 1, 1, 0]), k, sigma, 2)
    assert probs.dtype == torch.float32
    np.testing.assert_allclose(probs[0].numpy(), expected, rtol=1e-5, atol=1e-7)


# sigma = 0.005: exp(cos / sigma) reaches e^160, past float32's max: needs the max shift.
@pytest.mark.parametrize("seed,k,sigma", [(0, 1, 0.05), (1, 5, 0.05), (2, 20, 0.1), (3, 7, 1.0),
                                          (16, 5, 0.005)])
def test_knn_matches_float64_loop(seed, k, sigma):
    q, ql, bank, bl = _data(seed)
    probs = knn_probs(q, bank, bl, k, sigma, 5)
    np.testing.assert_allclose(probs.numpy(), _knn_reference(q, bank, bl, k, sigma, 5),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, rtol=1e-6)


def test_knn_chunk_sizes_identical():
    # Same neighbours and votes; BLAS picks another kernel per chunk shape (gemv for
    # one row), so float32 cosines may differ in the last bit (x 1/sigma in exp).
    q, _, bank, bl = _data(4)
    ref = knn_probs(q, bank, bl, 10, 0.05, 5, chunk_size=10_000)
    for cs in (1, 7):
        got = knn_probs(q, bank, bl, 10, 0.05, 5, chunk_size=cs)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.argmax(1), ref.argmax(1))


def test_knn_leave_one_out_equals_removing_row():
    _, _, bank, bl = _data(5, n=120)
    rows = torch.tensor([0, 17, 119, 50])
    exclude = rows.clone()
    exclude[3] = -1  # no exclusion for the last query
    probs = knn_probs(bank[rows], bank, bl, 8, 0.1, 5, chunk_size=3, exclude=exclude)
    for i, r in enumerate(rows.tolist()):
        keep = torch.ones(len(bank), dtype=torch.bool)
        if exclude[i] >= 0:
            keep[r] = False
        expected = knn_probs(bank[r:r + 1], bank[keep], bl[keep], 8, 0.1, 5)
        torch.testing.assert_close(probs[i:i + 1], expected)


def test_knn_predict_equals_probabilities_argmax_and_the_oracle():
    q, ql, bank, bl = _data(6)
    levels = {"fine": bl, "coarse": bl // 2}
    ncls = {"fine": 5, "coarse": 3}
    preds = knn_predict(q, bank, levels, 0, [1, 3, 10, 25], 0.05, ncls, CTX, chunk_size=9)
    assert set(preds) == {(lvl, k) for lvl in levels for k in (1, 3, 10, 25)}
    for (lvl, k), pred in preds.items():
        expected = knn_probs(q, bank, levels[lvl], k, 0.05, ncls[lvl]).argmax(1)
        assert torch.equal(pred, expected), (lvl, k)
        assert torch.equal(pred, oracles.knn_predict(q, bank, levels[lvl], k, 0.05, ncls[lvl])), (lvl, k)


def test_choose_k_equals_brute_force_leave_one_out():
    _, _, bank, bl = _data(7, n=150, classes=4)
    levels = {"fine": bl, "coarse": bl // 2}
    ncls = {"fine": 4, "coarse": 2}
    val = torch.tensor([3, 10, 44, 45, 99, 120, 149, 0, 77, 60])
    cands = (1, 3, 5, 9)
    got = choose_k(bank, levels, 0, val, cands, 0.05, ncls, CTX)
    for lvl, lab in levels.items():
        top1 = {}
        for k in cands:
            hits = 0
            for r in val.tolist():
                keep = torch.arange(len(bank)) != r
                p = _knn_reference(bank[r:r + 1], bank[keep], lab[keep], k, 0.05, ncls[lvl])
                hits += int(np.argmax(p[0]) == int(lab[r]))
            top1[k] = hits / len(val)
        best = min(cands, key=lambda k: (-top1[k], k))
        assert got[lvl][0] == best
        assert got[lvl][1] == pytest.approx(top1)
    assert got == oracles.choose_k(bank, levels, val, cands, 0.05, ncls)


# ------------------------------------------------------------------ retrieval AP

@pytest.fixture(params=["fused", "torch"])
def counting(request, monkeypatch):
    """Run an AP test through the compiled counting loop and through the torch reference path."""
    from grafit_core import ap_kernel
    if request.param == "torch":
        monkeypatch.setattr(ap_kernel, "usable", lambda scores: False)
    else:
        assert ap_kernel.kernel() is not None, "the AP kernel did not build (is a C compiler installed?)"
    return request.param


def _sklearn_aps(scores, relevant):
    return np.array([average_precision_score(relevant[i], scores[i]) if relevant[i].any() else np.nan
                     for i in range(len(scores))])


def test_ap_hand_worked(counting):
    # Ranking [rel, non, rel]: AP = (1/1 + 2/3) / 2.
    coll = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    ap = average_precisions(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), coll, torch.tensor([0, 1, 0]))
    assert ap.dtype == torch.float64
    assert ap[0].item() == pytest.approx((1 + 2 / 3) / 2, abs=1e-12)


def test_ap_random_matches_sklearn(counting):
    q, ql, coll, cl = _data(8)
    aps = average_precisions(q, ql, coll, cl, chunk_size=7)
    np.testing.assert_allclose(aps.numpy(), oracles.average_precisions(q, ql, coll, cl).numpy(), rtol=1e-12, atol=1e-12)
    rel = (ql[:, None] == cl[None, :]).numpy()
    np.testing.assert_allclose(aps.numpy(), _sklearn_aps(_cos64(q, coll), rel), rtol=1e-12, atol=1e-12)


def test_ap_tied_scores_match_sklearn(counting):
    # Scores rounded to 1 decimal: many ties, sklearn treats a tie as one threshold.
    g = torch.Generator().manual_seed(9)
    scores = (torch.rand(30, 200, generator=g) * 2 - 1).mul(10).round().div(10).float()
    cl, ql = torch.randint(0, 5, (200,), generator=g), torch.randint(0, 5, (30,), generator=g)
    ql[0] = 7  # no relevant item -> NaN
    relevant = ql[:, None] == cl[None, :]
    got = chunk_ap(scores, ql, LabelIndex(cl))[:, 0]
    expected = _sklearn_aps(scores.numpy(), relevant.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert math.isnan(got[0].item())


def test_map_at_r_brute_force_with_ties(counting):
    # MAP@R (Musgrave et al. 2020) in the same pass as AP: against a brute force that counts, for each
    # relevant item, the items at or above it (its rank among ties) and keeps those ranked within R
    g = torch.Generator().manual_seed(11)
    scores = (torch.rand(40, 300, generator=g) * 2 - 1).mul(8).round().div(8).float()   # many exact ties
    cl, ql = torch.randint(0, 6, (300,), generator=g), torch.randint(0, 6, (40,), generator=g)
    ql[3] = 9                                                                             # no relevant item
    got = chunk_ap(scores, ql, LabelIndex(cl))
    np.testing.assert_allclose(got[:, 1].numpy(), oracles.map_at_r(scores, ql[:, None] == cl[None, :]),
                               rtol=1e-12, atol=1e-12)
    assert math.isnan(got[3, 1].item()) and (got[:, 1][ql != 9] <= got[:, 0][ql != 9] + 1e-12).all()
    # without ties it is Musgrave's definition: precision at each of the first R ranks that holds a match
    scores = torch.rand(40, 300, generator=g)
    rel = (ql[:, None] == cl[None, :]).numpy()
    order = np.argsort(-scores.numpy(), axis=1, kind="stable")
    want = []
    for i in range(40):
        r = rel[i].sum()
        hits = rel[i][order[i]][:r]
        want.append(np.sum(np.cumsum(hits) / np.arange(1, r + 1) * hits) / r if r else np.nan)
    np.testing.assert_allclose(chunk_ap(scores, ql, LabelIndex(cl))[:, 1].numpy(), want, rtol=1e-12, atol=1e-12)


def test_ap_exact_ties_through_public_api(counting):
    # Rows among +-e_i: cosines are exactly -1, 0 or 1, so ties are exact in float32.
    g = torch.Generator().manual_seed(10)
    basis = torch.cat([torch.eye(4), -torch.eye(4)])
    q = basis[torch.randint(0, 8, (20,), generator=g)]
    coll = basis[torch.randint(0, 8, (100,), generator=g)]
    ql, cl = torch.randint(0, 3, (20,), generator=g), torch.randint(0, 3, (100,), generator=g)
    aps = average_precisions(q, ql, coll, cl, chunk_size=6)
    expected = _sklearn_aps((q @ coll.T).numpy(), (ql[:, None] == cl[None, :]).numpy())
    np.testing.assert_allclose(aps.numpy(), expected, rtol=1e-12, atol=1e-12)


def _conditioned64(q, coll, probs, coarse):
    """cos + log(p / (1 - p)) in float64 loops, p clipped to [1e-6, 1 - 1e-6]."""
    cos = _cos64(q, coll)
    out = np.empty_like(cos)
    for i in range(cos.shape[0]):
        for n in range(cos.shape[1]):
            p = min(max(float(probs[i, coarse[n]]), 1e-6), 1 - 1e-6)
            out[i, n] = cos[i, n] + math.log(p / (1 - p))
    return out


def test_ap_conditioned_matches_sklearn(counting):
    q, ql, coll, cl = _data(11, q=30, n=200, classes=6)
    coarse = cl // 2
    g = torch.Generator().manual_seed(12)
    probs = torch.softmax(torch.randn(30, 3, generator=g) * 2, dim=1)
    aps = average_precisions(q, ql, coll, cl, coarse=coarse, probs=probs)
    rel = (ql[:, None] == cl[None, :]).numpy()
    expected = _sklearn_aps(_conditioned64(q, coll, probs.numpy(), coarse.numpy()), rel)
    np.testing.assert_allclose(aps.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(aps.numpy(), oracles.average_precisions(q, ql, coll, cl, coarse, probs).numpy(),
                               rtol=1e-12, atol=1e-12)


def test_ap_oracle_one_hot(counting):
    q, ql, coll, cl = _data(13, q=30, n=200, classes=6)
    coarse = cl // 2
    oracle = torch.nn.functional.one_hot(ql // 2, 3).float()
    aps = average_precisions(q, ql, coll, cl, coarse=coarse, probs=oracle)
    rel = (ql[:, None] == cl[None, :]).numpy()
    expected = _sklearn_aps(_conditioned64(q, coll, oracle.numpy(), coarse.numpy()), rel)
    np.testing.assert_allclose(aps.numpy(), expected, rtol=1e-12, atol=1e-12)
    # Fine classes nest in coarse ones: the oracle can only move relevant items up.
    assert (aps >= average_precisions(q, ql, coll, cl) - 1e-12).all()
    assert oracles.retrieval_map(aps) > oracles.retrieval_map(average_precisions(q, ql, coll, cl))


def test_no_relevant_query_is_nan_and_left_out_of_mean(counting):
    q, ql, coll, cl = _data(14, q=10, n=100, classes=3)
    ql[[2, 7]] = 99  # no collection item has label 99
    aps = average_precisions(q, ql, coll, cl)
    assert torch.isnan(aps[[2, 7]]).all() and not torch.isnan(aps[[0, 1, 3]]).any()
    np.testing.assert_allclose(aps.numpy(), oracles.average_precisions(q, ql, coll, cl).numpy(), rtol=1e-12,
                               atol=1e-12)
    keep = torch.ones(10, dtype=torch.bool)
    keep[[2, 7]] = False
    assert oracles.retrieval_map(aps) == pytest.approx(aps[keep].mean().item(), abs=1e-15)
    assert torch.isnan(average_precisions(q[:1], torch.tensor([99]), coll, cl)).all()


def test_ap_chunk_sizes_and_row_groups(counting):
    # AP no longer takes an exclude (no evaluation leaves a query out of AP); what changes with
    # the chunking instead: the queries per score matrix, and the row groups that keep the
    # q x R thresholds and counts within the budget (here 1-3 rows per group)
    _, _, coll, cl = _data(15, n=150)
    rows = torch.tensor([5, 0, 149, 80])
    ref = average_precisions(coll[rows], cl[rows], coll, cl, chunk_size=1000)
    for cs in (1, 3):
        assert torch.equal(average_precisions(coll[rows], cl[rows], coll, cl, chunk_size=cs), ref)
    scores = normalise(coll[rows]) @ normalise(coll).T
    index = LabelIndex(cl)
    r_max = int(index.counts(cl[rows]).max())
    pair = PAIR_BYTES if counting == "torch" else FUSED_PAIR_BYTES
    for budget in (1, pair * r_max * 2, pair * r_max * 3):
        got = chunk_ap(scores, cl[rows], index, budget=budget)[:, 0]
        assert torch.equal(got, ref)        # each row's AP is summed alone: the same bits in any group
    np.testing.assert_allclose(ref.numpy(), oracles.average_precisions(coll[rows], cl[rows], coll, cl).numpy(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("classes", [2, 7])
def test_ap_compiled_and_torch_paths_give_the_same_bits(classes, monkeypatch):
    # a coarse level (R ~ N / C in the hundreds), exact ties (quantised embeddings), queries of an
    # absent class, cosine and eq. 5: the compiled gather, count and AP against the torch path
    assert ap_kernel.kernel() is not None, "the AP kernel did not build (is a C compiler installed?)"
    g = torch.Generator().manual_seed(classes)
    coll = (torch.randn(1200, 8, generator=g) * 2).round()
    q = (torch.randn(50, 8, generator=g) * 2).round()
    cl, ql = torch.randint(0, classes, (1200,), generator=g), torch.randint(0, classes + 1, (50,), generator=g)
    scores = normalise(q) @ normalise(coll).T
    index = LabelIndex(cl, classes + 1)
    shift = (torch.randn(50, 3, generator=g), cl % 3)
    fused = [chunk_ap(scores, ql, index, shift=s, budget=b) for s in (None, shift) for b in (1 << 20, 1 << 14)]
    monkeypatch.setattr(ap_kernel, "usable", lambda scores: False)
    ref = [chunk_ap(scores, ql, index, shift=s, budget=b) for s in (None, shift) for b in (1 << 20, 1 << 14)]
    for got, want in zip(fused, ref):
        np.testing.assert_array_equal(got.numpy(), want.numpy())     # NaN == NaN, else the same bits
    assert torch.isnan(fused[0][ql == classes]).all()


def test_faiss_backend_gives_the_torch_neighbours():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(21)
    bank, query = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = {"fine": torch.randint(0, 6, (300,), generator=g)}
    labels["coarse"] = labels["fine"] // 2
    nc = {"fine": 6, "coarse": 3}
    for kw in ({}, {"exclude": torch.arange(40) * 7}):
        q = bank[torch.arange(40) * 7] if kw else query            # leave-one-out: the query is a bank row
        ref = knn_probs(q, bank, labels["fine"], 10, 0.1, 6, chunk_size=16, **kw)
        got = knn_probs(q, bank, labels["fine"], 10, 0.1, 6, chunk_size=16, backend="faiss", **kw)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    val = torch.arange(0, 300, 5)
    assert choose_k(bank, labels, 0, val, (1, 5, 20), 0.1, nc, CTX, backend="faiss") == \
        choose_k(bank, labels, 0, val, (1, 5, 20), 0.1, nc, CTX)
