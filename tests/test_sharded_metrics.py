"""Sharded kNN / choose_k / AP in real gloo processes equal grafit_core.metrics on the whole bank."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from grafit_core.distributed import DistContext
from grafit_core.memory import shard_bounds
from grafit_core.metrics import (
    average_precisions,
    choose_k,
    knn_classify,
    knn_predict_multi,
    retrieval_map,
)
from grafit_core.sharded_metrics import (
    shard_range,
    sharded_average_precisions,
    sharded_choose_k,
    sharded_knn_classify,
    sharded_knn_predict_multi,
    sharded_evaluate_pass,
    sharded_retrieval_map,
)
from gloo import run_gloo

torch.set_num_threads(1)
N, D, SIGMA = 101, 16, 0.1          # 101 is divisible by neither 2 nor 3
KS = (1, 5, 40, 200)                 # 40 > a shard (34 or 51 rows), 200 > N: both are clamped/padded
NUM_CLASSES = {"fine": 6, "coarse": 3}
CANDIDATES = (1, 3, 5, 40)
VAL = torch.tensor([0, 33, 34, 50, 51, 67, 68, 100])   # on both sides of every shard boundary
EXCLUDE_ROWS = torch.tensor([3, 60, 100, 12, 90])
EXCLUDE = torch.tensor([3, -1, 100, 12, -1])           # leave-one-out, two queries without


def knn_problem(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(n, D, generator=g) * 3           # unnormalised: normalisation is inside
    fine = torch.randint(0, 6, (n,), generator=g)
    return torch.randn(37, D, generator=g), bank, {"fine": fine, "coarse": fine // 2}


def ap_problem(seed=1, n=N):
    """Random cosine data. Query 0 has no relevant item anywhere; label 7 lives only in the
    first rows (shard 0) and label 8 only in the last rows (last shard): for queries 1-3 the
    other shards hold no relevant item."""
    g = torch.Generator().manual_seed(seed)
    q, coll = torch.randn(30, D, generator=g), torch.randn(n, D, generator=g)
    ql, cl = torch.randint(0, 6, (30,), generator=g), torch.randint(0, 6, (n,), generator=g)
    cl[:3], cl[-2:] = 7, 8
    ql[:4] = torch.tensor([99, 7, 7, 8])
    coarse = cl // 2
    probs = torch.softmax(torch.randn(30, 5, generator=g) * 2, dim=1)
    oracle = F.one_hot(ql.clamp(max=9) // 2, 5).float()
    return q, ql, coll, cl, coarse, probs, oracle


def tie_problem(seed=2, n=N):
    """Rows among +-e_i: cosines are exactly -1, 0, 1 whatever the matmul's blocking, so the
    float32 scores (and eq. 5 sums with the same logits) are bitwise equal on a shard."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.cat([torch.eye(4), -torch.eye(4)])
    q, coll = basis[torch.randint(0, 8, (20,), generator=g)], basis[torch.randint(0, 8, (n,), generator=g)]
    ql, cl = torch.randint(0, 3, (20,), generator=g), torch.randint(0, 3, (n,), generator=g)
    ql[0] = 5
    probs = torch.tensor([0.25, 0.5, 0.75])[torch.randint(0, 3, (20, 2), generator=g)]
    return q, ql, coll, cl, cl % 2, probs


def _mine(ctx, n):
    lo, hi = shard_range(n, ctx.world_size, ctx.rank)
    return lo, hi, slice(lo, hi)


# ---------------------------------------------------------------------------- workers

def knn_worker(ctx):
    query, bank, labels = knn_problem()
    lo, _, own = _mine(ctx, N)
    shard, mine = bank[own], {lvl: lab[own] for lvl, lab in labels.items()}
    out = {
        "preds": sharded_knn_predict_multi(query, shard, mine, lo, KS, SIGMA, NUM_CLASSES, ctx,
                                           chunk_size=10),
        "probs": sharded_knn_classify(query, shard, mine["fine"], lo, 40, SIGMA, 6, ctx, chunk_size=16),
        "probs_ex": sharded_knn_classify(bank[EXCLUDE_ROWS], shard, mine["fine"], lo, 5, SIGMA, 6, ctx,
                                         chunk_size=2, exclude=EXCLUDE),
        "preds_faiss": sharded_knn_predict_multi(query, shard, mine, lo, KS, SIGMA, NUM_CLASSES, ctx,
                                                 backend="faiss"),
        "choose_k": sharded_choose_k(shard, mine, lo, VAL, CANDIDATES, SIGMA, NUM_CLASSES, ctx,
                                     chunk_size=3),
    }
    if ctx.world_size == 3:  # N = 2 < W: the last shard is empty
        q2, b2, l2 = knn_problem(n=2)
        lo2, _, own2 = _mine(ctx, 2)
        out["tiny"] = sharded_knn_classify(q2, b2[own2], l2["fine"][own2], lo2, 5, SIGMA, 6, ctx)
    return out


def ap_worker(ctx):
    q, ql, coll, cl, coarse, probs, oracle = ap_problem()
    lo, _, own = _mine(ctx, N)
    args = (q, ql, coll[own], cl[own], lo, ctx)
    out = {
        "cos": sharded_average_precisions(*args, chunk_size=7),
        "cond": sharded_average_precisions(*args, shard_coarse=coarse[own], query_coarse_probs=probs),
        "oracle": sharded_average_precisions(*args, shard_coarse=coarse[own], query_coarse_probs=oracle,
                                             chunk_size=4),
        "map": sharded_retrieval_map(*args, chunk_size=5),
        "map_nan": sharded_retrieval_map(q[:1], ql[:1], coll[own], cl[own], lo, ctx),
        "exclude": sharded_average_precisions(coll[EXCLUDE_ROWS], cl[EXCLUDE_ROWS], coll[own], cl[own],
                                              lo, ctx, chunk_size=2, exclude=EXCLUDE),
    }
    tq, tql, tcoll, tcl, tcoarse, tprobs = tie_problem()
    targs = (tq, tql, tcoll[own], tcl[own], lo, ctx)
    out["tie_cos"] = sharded_average_precisions(*targs, chunk_size=6)
    out["tie_cond"] = sharded_average_precisions(*targs, shard_coarse=tcoarse[own], query_coarse_probs=tprobs)
    if ctx.world_size == 3:  # N = 2 < W: the last shard is empty
        lo2, _, own2 = _mine(ctx, 2)
        out["tiny"] = sharded_average_precisions(q, ql, coll[:2][own2], cl[:2][own2], lo2, ctx)
    return out


def _bytes_moved(ctx):
    """Per collective of sharded_average_precisions, the bytes it moves (an all_gather counts its
    W-fold output), for N = 2,000 and 8,000 with the same queries and R = 40 relevant items per
    query placed at random."""
    moved = []
    orig_gather, orig_reduce = dist.all_gather, dist.all_reduce

    def gather(out, t, *a, **k):
        moved.append(("all_gather", t.numel() * t.element_size() * len(out)))
        return orig_gather(out, t, *a, **k)

    def reduce(t, *a, **k):
        moved.append(("all_reduce", t.numel() * t.element_size()))
        return orig_reduce(t, *a, **k)

    dist.all_gather, dist.all_reduce = gather, reduce
    logs = {}
    try:
        for n in (2_000, 8_000):
            g = torch.Generator().manual_seed(0)
            q, ql = torch.randn(50, 32, generator=g), torch.arange(50) % 5
            coll, cl = torch.randn(n, 32, generator=g), torch.full((n,), -1)
            cl[torch.randperm(n, generator=g)[:200]] = torch.arange(200) % 5   # 40 rows per class
            lo, _, own = _mine(ctx, n)
            moved.clear()
            sharded_average_precisions(q, ql, coll[own], cl[own], lo, ctx, chunk_size=16)
            logs[n] = list(moved)
    finally:
        dist.all_gather, dist.all_reduce = orig_gather, orig_reduce
    return logs


def pass_problem():
    """Two levels (fine 6 classes, coarse = fine // 2), for the one-pass evaluation."""
    q, ql, coll, cl, _, probs, _ = ap_problem()
    q, ql, probs = q[4:], ql[4:], probs[4:, :3]           # labels present in the collection
    cl = cl.clamp(max=5)
    return q, {"fine": ql, "coarse": ql // 2}, coll, {"fine": cl, "coarse": cl // 2}, probs


PASS_VOTES = {("fine", 1, SIGMA), ("fine", 5, SIGMA), ("coarse", 5, 0.5), ("coarse", 40, SIGMA)}


def pass_rankings(qlabels, probs):
    return {"cosine": None, "given": ("probs", "coarse", probs),
            "oracle": ("probs", "coarse", F.one_hot(qlabels["coarse"], 3).float()),
            "knn": ("knn", "coarse", 5, 0.5)}


def pass_worker(ctx, chunk_size=7):
    q, ql, coll, cl, probs = pass_problem()
    lo, _, own = _mine(ctx, N)
    preds, aps = sharded_evaluate_pass(q, coll[own], lo, {lv: x[own] for lv, x in cl.items()}, ql,
                                       NUM_CLASSES, ctx, votes=PASS_VOTES, ap_levels=["fine", "coarse"],
                                       rankings=pass_rankings(ql, probs), chunk_size=chunk_size)
    return {"preds": preds, "aps": aps}


def worker(ctx):
    """Everything in one spawn per world size: starting W processes costs seconds."""
    return {"knn": knn_worker(ctx), "ap": ap_worker(ctx), "bytes": _bytes_moved(ctx), "pass": pass_worker(ctx)}


_RESULTS = {}


def _run(world_size):
    if world_size not in _RESULTS:
        _RESULTS[world_size] = run_gloo(worker, world_size)
    return _RESULTS[world_size]


# ------------------------------------------------------------------------------ tests

def _same_on_every_rank(results, key):
    for res in results[1:]:
        a, b = res[key], results[0][key]
        if isinstance(a, dict) and key.startswith("preds"):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
        elif isinstance(a, torch.Tensor):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=key)   # NaN == NaN
        else:
            assert a == b or (math.isnan(a) and math.isnan(b)), key


def _sklearn_aps(scores, relevant):
    from sklearn.metrics import average_precision_score   # here: the gloo workers skip its import
    return np.array([average_precision_score(relevant[i], scores[i]) if relevant[i].any() else np.nan
                     for i in range(len(scores))])


def test_shard_range_tiles_the_bank():
    for n in (0, 1, 2, 7, 101, 1000):
        for w in (1, 2, 3, 4, 7):
            ranges = [shard_range(n, w, r) for r in range(w)]
            assert ranges == [shard_bounds(n, w, r) for r in range(w)]   # same layout as the memory
            assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
            assert all(b - a <= -(-n // w) for a, b in ranges)
    assert shard_range(2, 3, 2) == (2, 2)
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


def test_single_process_context_equals_metrics_exactly():
    ctx = DistContext()
    query, bank, labels = knn_problem()
    assert torch.equal(sharded_knn_classify(query, bank, labels["fine"], 0, 5, SIGMA, 6, ctx, chunk_size=8),
                       knn_classify(query, bank, labels["fine"], 5, SIGMA, 6, chunk_size=8))
    assert sharded_choose_k(bank, labels, 0, VAL, CANDIDATES, SIGMA, NUM_CLASSES, ctx) == \
        choose_k(bank, labels, VAL, CANDIDATES, SIGMA, NUM_CLASSES)
    q, ql, coll, cl, coarse, probs, _ = ap_problem()
    np.testing.assert_array_equal(
        sharded_average_precisions(q, ql, coll, cl, 0, ctx, shard_coarse=coarse, query_coarse_probs=probs),
        average_precisions(q, ql, coll, cl, collection_coarse=coarse, query_coarse_probs=probs))
    with pytest.raises(ValueError, match="tile"):   # offset must say where the shard sits
        sharded_average_precisions(q, ql, coll, cl, 5, ctx)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_knn_and_choose_k_equal_single_process(world_size):
    query, bank, labels = knn_problem()
    results = [res["knn"] for res in _run(world_size)]
    for key in results[0]:
        _same_on_every_rank(results, key)
    got = results[0]
    preds = knn_predict_multi(query, bank, labels, KS, SIGMA, NUM_CLASSES, chunk_size=10)
    assert got["preds"].keys() == preds.keys()
    for key in preds:
        assert torch.equal(got["preds"][key], preds[key]), key
        assert torch.equal(got["preds_faiss"][key], preds[key]), key       # faiss flat, merged over shards
    torch.testing.assert_close(got["probs"], knn_classify(query, bank, labels["fine"], 40, SIGMA, 6),
                               atol=1e-5, rtol=0)
    expected = knn_classify(bank[EXCLUDE_ROWS], bank, labels["fine"], 5, SIGMA, 6, exclude=EXCLUDE)
    torch.testing.assert_close(got["probs_ex"], expected, atol=1e-5, rtol=0)
    assert got["choose_k"] == choose_k(bank, labels, VAL, CANDIDATES, SIGMA, NUM_CLASSES)
    if world_size == 3:
        q2, b2, l2 = knn_problem(n=2)
        torch.testing.assert_close(got["tiny"], knn_classify(q2, b2, l2["fine"], 5, SIGMA, 6),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_average_precisions_equal_single_process(world_size):
    q, ql, coll, cl, coarse, probs, oracle = ap_problem()
    assert (cl[shard_range(N, world_size, world_size - 1)[0]:] != 7).all()   # the case claimed
    results = [res["ap"] for res in _run(world_size)]
    for key in results[0]:
        _same_on_every_rank(results, key)
    got = results[0]
    expected = {
        "cos": average_precisions(q, ql, coll, cl),
        "cond": average_precisions(q, ql, coll, cl, collection_coarse=coarse, query_coarse_probs=probs),
        "oracle": average_precisions(q, ql, coll, cl, collection_coarse=coarse, query_coarse_probs=oracle),
        "exclude": average_precisions(coll[EXCLUDE_ROWS], cl[EXCLUDE_ROWS], coll, cl, exclude=EXCLUDE),
    }
    for key, exp in expected.items():   # random data: a shard's matmul may round differently
        np.testing.assert_allclose(got[key].numpy(), exp.numpy(), rtol=0, atol=1e-6, err_msg=key)
    assert math.isnan(got["cos"][0]) and not torch.isnan(got["cos"][1:]).any()
    assert got["map"] == pytest.approx(retrieval_map(q, ql, coll, cl), abs=1e-6)
    assert math.isnan(got["map_nan"])

    tq, tql, tcoll, tcl, tcoarse, tprobs = tie_problem()   # exact ties: bitwise equal
    # same chunk size: a chunk's max #relevant sets the length of the float64 sum of precisions,
    # which may change its last bit
    np.testing.assert_array_equal(got["tie_cos"].numpy(),
                                  average_precisions(tq, tql, tcoll, tcl, chunk_size=6).numpy())
    np.testing.assert_array_equal(got["tie_cond"].numpy(), average_precisions(
        tq, tql, tcoll, tcl, collection_coarse=tcoarse, query_coarse_probs=tprobs).numpy())
    rel = (tql[:, None] == tcl[None, :]).numpy()
    np.testing.assert_allclose(got["tie_cos"].numpy(), _sklearn_aps((tq @ tcoll.T).numpy(), rel),
                               rtol=1e-12, atol=1e-12)
    if world_size == 3:
        np.testing.assert_allclose(got["tiny"].numpy(), average_precisions(q, ql, coll[:2], cl[:2]).numpy(),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_one_pass_evaluation_equals_the_metric_by_metric_functions(world_size):
    """Every kNN prediction and every AP (cosine, given p_c, oracle, p_c from the pass's own
    votes) from one score matrix per chunk equal the single-purpose reference functions."""
    q, ql, coll, cl, probs = pass_problem()
    got = pass_worker(DistContext()) if world_size == 1 else _run(world_size)[0]["pass"]
    for lv, k, sigma in PASS_VOTES:
        ref = knn_predict_multi(q, coll, {lv: cl[lv]}, [k], sigma, NUM_CLASSES)[(lv, k)]
        assert torch.equal(got["preds"][(lv, k, sigma)], ref), (lv, k, sigma)
    knn_probs = knn_classify(q, coll, cl["coarse"], 5, 0.5, 3)
    for name, p in [("cosine", None), ("given", probs), ("oracle", F.one_hot(ql["coarse"], 3).float()),
                    ("knn", knn_probs)]:
        for lv in ("fine", "coarse"):
            ref = average_precisions(q, ql[lv], coll, cl[lv], collection_coarse=None if p is None else cl["coarse"],
                                     query_coarse_probs=p)
            np.testing.assert_allclose(got["aps"][(name, lv)].numpy(), ref.numpy(), rtol=0, atol=1e-6,
                                       err_msg=f"{name} {lv}")


@pytest.mark.parametrize("world_size", [2, 3])
def test_ap_communication_is_independent_of_n(world_size):
    for logs in (res["bytes"] for res in _run(world_size)):
        assert logs[2_000] == logs[8_000]
        sent = sum(b for _, b in logs[8_000])
        # 50 queries x 40 relevant scores and counts, a few times over: far below one
        # rank's 4,000 x 32 rows or a 50 x 8,000 score matrix (1.6 MB)
        assert sent < 8_000 * 32 * 4 / 10, sent
