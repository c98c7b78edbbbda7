"""The one-pass evaluation in real gloo processes (W = 2, 3, 4) equals itself at W = 1 and the oracles
of tests/oracles.py on the whole collection."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import oracles
from grafit_core.distributed import DistContext
from grafit_core.memory import shard_bounds
from grafit_core.metrics import Ranking, choose_k, evaluate_pass, knn_neighbours, knn_predict, vote
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
    lo, hi = shard_bounds(n, ctx.world_size, ctx.rank)
    return lo, hi, slice(lo, hi)


def knn_probs(query, shard, labels, offset, k, ctx, **kw):
    """(Q, C) eq. 6 probabilities from the pass's merged neighbours and votes."""
    return torch.cat([vote(sims, labs[0], k, SIGMA, 6)
                      for _, sims, labs, _ in knn_neighbours(query, shard, [labels], offset, k, ctx, **kw)])


def pass_aps(q, ql, coll, cl, offset, ctx, coarse=None, probs=None, chunk_size=None, column=0):
    """(Q,) APs (column 1: MAP@R) of the one pass on this rank's shard, cosine or eq. 5 with the given p_c."""
    labels, nc, ranking = {"fine": cl}, {"fine": 10}, Ranking()
    if probs is not None:
        labels["coarse"], nc["coarse"], ranking = coarse, probs.shape[1], Ranking("coarse", probs=probs)
    _, aps = evaluate_pass(q, coll, offset, labels, {"fine": ql}, nc, ctx, votes=set(), ap_levels=["fine"],
                           rankings={"r": ranking}, chunk_size=chunk_size)
    return aps[("r", "fine")][:, column]


# ---------------------------------------------------------------------------- workers

def knn_worker(ctx):
    query, bank, labels = knn_problem()
    lo, _, own = _mine(ctx, N)
    shard, mine = bank[own], {lvl: lab[own] for lvl, lab in labels.items()}
    out = {
        "preds": knn_predict(query, shard, mine, lo, KS, SIGMA, NUM_CLASSES, ctx, chunk_size=10),
        "probs": knn_probs(query, shard, mine["fine"], lo, 40, ctx, chunk_size=16),
        "probs_ex": knn_probs(bank[EXCLUDE_ROWS], shard, mine["fine"], lo, 5, ctx, chunk_size=2, exclude=EXCLUDE),
        "preds_faiss": knn_predict(query, shard, mine, lo, KS, SIGMA, NUM_CLASSES, ctx, backend="faiss"),
        "choose_k": choose_k(shard, mine, lo, VAL, CANDIDATES, SIGMA, NUM_CLASSES, ctx, chunk_size=3),
    }
    if ctx.world_size == 3:  # N = 2 < W: the last shard is empty
        q2, b2, l2 = knn_problem(n=2)
        lo2, _, own2 = _mine(ctx, 2)
        out["tiny"] = knn_probs(q2, b2[own2], l2["fine"][own2], lo2, 5, ctx)
    return out


def ap_worker(ctx):
    q, ql, coll, cl, coarse, probs, oracle = ap_problem()
    lo, _, own = _mine(ctx, N)
    args = (q, ql, coll[own], cl[own], lo, ctx)
    out = {
        "cos": pass_aps(*args, chunk_size=7),
        "cond": pass_aps(*args, coarse[own], probs),
        "oracle": pass_aps(*args, coarse[own], oracle, chunk_size=4),
        "nan": pass_aps(q[:1], ql[:1], coll[own], cl[own], lo, ctx),
    }
    tq, tql, tcoll, tcl, tcoarse, tprobs = tie_problem()
    targs = (tq, tql, tcoll[own], tcl[own], lo, ctx)
    out["tie_cos"] = pass_aps(*targs, chunk_size=6)
    out["tie_cond"] = pass_aps(*targs, tcoarse[own], tprobs)
    out["tie_at_r"] = pass_aps(*targs, tcoarse[own], tprobs, chunk_size=5, column=1)
    if ctx.world_size == 3:  # N = 2 < W: the last shard is empty
        lo2, _, own2 = _mine(ctx, 2)
        out["tiny"] = pass_aps(q, ql, coll[:2][own2], cl[:2][own2], lo2, ctx)
    return out


def _bytes_moved(ctx):
    """Per collective of the pass's AP, the bytes it moves (an all_gather counts its W-fold output),
    for N = 2,000 and 8,000 with the same queries and R = 40 relevant items per query placed at
    random."""
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
            pass_aps(q, ql, coll[own], cl[own], lo, ctx, chunk_size=16)
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
    return {"cosine": Ranking(), "given": Ranking("coarse", probs=probs),
            "oracle": Ranking("coarse", probs=F.one_hot(qlabels["coarse"], 3).float()),
            "knn": Ranking("coarse", k=5, sigma=0.5)}


def pass_worker(ctx, chunk_size=7):
    q, ql, coll, cl, probs = pass_problem()
    lo, _, own = _mine(ctx, N)
    preds, aps = evaluate_pass(q, coll[own], lo, {lv: x[own] for lv, x in cl.items()}, ql,
                               NUM_CLASSES, ctx, votes=PASS_VOTES, ap_levels=["fine", "coarse"],
                               rankings=pass_rankings(ql, probs), chunk_size=chunk_size)
    return {"preds": preds, "aps": aps}


def worker(ctx):
    """Everything in one spawn per world size: starting W processes costs seconds."""
    return {"knn": knn_worker(ctx), "ap": ap_worker(ctx), "bytes": _bytes_moved(ctx), "pass": pass_worker(ctx)}


_RESULTS = {}


def _run(world_size):
    if world_size not in _RESULTS:
        _RESULTS[world_size] = [worker(DistContext())] if world_size == 1 else run_gloo(worker, world_size)
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


def test_shard_bounds_tile_the_bank():
    for n in (0, 1, 2, 7, 101, 1000):
        for w in (1, 2, 3, 4, 7):
            ranges = [shard_bounds(n, w, r) for r in range(w)]
            assert [i for a, b in ranges for i in range(a, b)] == list(range(n))
            assert all(b - a <= -(-n // w) for a, b in ranges)
    assert shard_bounds(2, 3, 2) == (2, 2)
    with pytest.raises(ValueError):
        shard_bounds(10, 2, 2)


def test_single_process_equals_the_oracles():
    got = _run(1)[0]
    query, bank, labels = knn_problem()
    for (lv, k), pred in got["knn"]["preds"].items():
        assert torch.equal(pred, oracles.knn_predict(query, bank, labels[lv], k, SIGMA, NUM_CLASSES[lv])), (lv, k)
    assert got["knn"]["choose_k"] == oracles.choose_k(bank, labels, VAL, CANDIDATES, SIGMA, NUM_CLASSES)
    q, ql, coll, cl, coarse, probs, oracle = ap_problem()
    for key, p in (("cos", None), ("cond", probs), ("oracle", oracle)):
        ref = oracles.average_precisions(q, ql, coll, cl, coarse, p)
        np.testing.assert_allclose(got["ap"][key].numpy(), ref.numpy(), rtol=1e-12, atol=1e-12, err_msg=key)
    with pytest.raises(ValueError, match="tile"):   # offset must say where the shard sits
        pass_aps(q, ql, coll, cl, 5, DistContext())


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sharded_knn_and_choose_k_equal_single_process(world_size):
    query, bank, labels = knn_problem()
    results = [res["knn"] for res in _run(world_size)]
    for key in results[0]:
        _same_on_every_rank(results, key)
    got, one = results[0], _run(1)[0]["knn"]
    assert got["preds"].keys() == one["preds"].keys()
    for key in one["preds"]:
        assert torch.equal(got["preds"][key], one["preds"][key]), key
        assert torch.equal(got["preds_faiss"][key], one["preds"][key]), key       # faiss flat, merged over shards
        lv, k = key
        assert torch.equal(got["preds"][key], oracles.knn_predict(query, bank, labels[lv], k, SIGMA, NUM_CLASSES[lv]))
    torch.testing.assert_close(got["probs"], one["probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["probs_ex"], one["probs_ex"], atol=1e-5, rtol=0)
    assert torch.equal(got["probs_ex"].argmax(1), oracles.knn_predict(bank[EXCLUDE_ROWS], bank, labels["fine"], 5,
                                                                      SIGMA, 6, exclude=EXCLUDE))
    assert got["choose_k"] == one["choose_k"] == oracles.choose_k(bank, labels, VAL, CANDIDATES, SIGMA, NUM_CLASSES)
    if world_size == 3:
        q2, b2, l2 = knn_problem(n=2)
        torch.testing.assert_close(got["tiny"], knn_probs(q2, b2, l2["fine"], 0, 5, DistContext()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sharded_average_precisions_equal_single_process(world_size):
    q, ql, coll, cl, coarse, probs, oracle = ap_problem()
    assert (cl[shard_bounds(N, world_size, world_size - 1)[0]:] != 7).all()   # the case claimed
    results = [res["ap"] for res in _run(world_size)]
    for key in results[0]:
        _same_on_every_rank(results, key)
    got, one = results[0], _run(1)[0]["ap"]
    for key in ("cos", "cond", "oracle"):   # random data: a shard's matmul may round differently
        np.testing.assert_allclose(got[key].numpy(), one[key].numpy(), rtol=0, atol=1e-6, err_msg=key)
    assert math.isnan(got["cos"][0]) and not torch.isnan(got["cos"][1:]).any()
    assert oracles.retrieval_map(got["cos"]) == pytest.approx(oracles.retrieval_map(
        oracles.average_precisions(q, ql, coll, cl)), abs=1e-6)
    assert torch.isnan(got["nan"]).all()

    tq, tql, tcoll, tcl, tcoarse, tprobs = tie_problem()   # exact ties: bitwise equal to W = 1
    np.testing.assert_array_equal(got["tie_cos"].numpy(), one["tie_cos"].numpy())
    np.testing.assert_array_equal(got["tie_cond"].numpy(), one["tie_cond"].numpy())
    np.testing.assert_allclose(got["tie_cos"].numpy(), oracles.average_precisions(tq, tql, tcoll, tcl).numpy(),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got["tie_cond"].numpy(), oracles.average_precisions(
        tq, tql, tcoll, tcl, tcoarse, tprobs).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got["tie_at_r"].numpy(), one["tie_at_r"].numpy())     # MAP@R, ties, sharded
    np.testing.assert_allclose(got["tie_at_r"].numpy(), oracles.map_at_r(
        oracles.ranked_scores(tq, tcoll, tcoarse, tprobs), tql[:, None] == tcl[None]), rtol=1e-12, atol=1e-12)
    if world_size == 3:
        np.testing.assert_allclose(got["tiny"].numpy(), oracles.average_precisions(q, ql, coll[:2], cl[:2]).numpy(),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_one_pass_evaluation_equals_the_oracles(world_size):
    """Every kNN prediction and every AP (cosine, given p_c, oracle, p_c from the pass's own
    votes) from one score matrix per chunk equal the oracles, metric by metric."""
    q, ql, coll, cl, probs = pass_problem()
    got = _run(world_size)[0]["pass"]
    for lv, k, sigma in PASS_VOTES:
        ref = oracles.knn_predict(q, coll, cl[lv], k, sigma, NUM_CLASSES[lv])
        assert torch.equal(got["preds"][(lv, k, sigma)], ref), (lv, k, sigma)
    knn_probs5 = torch.cat([vote(s, labs[0], 5, 0.5, 3) for _, s, labs, _ in
                            knn_neighbours(q, coll, [cl["coarse"]], 0, 5, DistContext())])
    for name, p in [("cosine", None), ("given", probs), ("oracle", F.one_hot(ql["coarse"], 3).float()),
                    ("knn", knn_probs5)]:
        for lv in ("fine", "coarse"):
            ref = oracles.average_precisions(q, ql[lv], coll, cl[lv], cl["coarse"], p)
            np.testing.assert_allclose(got["aps"][(name, lv)][:, 0].numpy(), ref.numpy(), rtol=0, atol=1e-6,
                                       err_msg=f"{name} {lv}")
            ref = oracles.map_at_r(oracles.ranked_scores(q, coll, cl["coarse"], p), ql[lv][:, None] == cl[lv][None])
            np.testing.assert_allclose(got["aps"][(name, lv)][:, 1].numpy(), ref, rtol=0, atol=1e-6,
                                       err_msg=f"MAP@R {name} {lv}")


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ap_communication_is_independent_of_n(world_size):
    for logs in (res["bytes"] for res in _run(world_size)):
        assert logs[2_000] == logs[8_000]
        sent = sum(b for _, b in logs[8_000])
        # 50 queries x 40 relevant scores and counts, a few times over: far below one
        # rank's 4,000 x 32 rows or a 50 x 8,000 score matrix (1.6 MB)
        assert sent < 8_000 * 32 * 4 / 10, sent
