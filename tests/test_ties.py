"""Exact ties: every kNN takes the lower global row first among equal scores, so predictions and
the chosen k are the same at W = 1, 2, 3, 4 (real gloo processes) and equal a stable sort's."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import oracles
from grafit_core.distributed import DistContext
from grafit_core.evaluate import online_knn
from grafit_core.memory import shard_bounds
from grafit_core.metrics import Ranking, choose_k, evaluate_pass, knn_neighbours, knn_predict
from gloo import run_gloo

torch.set_num_threads(1)
N, D, SIGMA = 101, 16, 1.0     # a wide sigma: neighbours at the tied k-th place weigh in the vote
KS = (1, 5, 17, 40)                      # 40 > a shard at W = 3 (34 rows): padded in the merge
NUM_CLASSES = {"fine": 6, "coarse": 3}
BOUNDARY = [0, 33, 34, 50, 51, 67, 68, 100]   # the last / first rows of the shards at W = 2, 3
VAL = torch.tensor(BOUNDARY + [10, 20, 80])
EXCLUDE = torch.tensor(BOUNDARY)


def tied_problem():
    """Rows with four entries of +-1, the rest 0: normalised entries are +-0.5, so every cosine is
    a multiple of 0.25, exact in float32 whatever the matmul's blocking, and most are tied. Row 0
    is copied on both sides of every shard boundary (duplicate images), with other labels."""
    g = torch.Generator().manual_seed(3)
    bank = torch.zeros(N, D)
    for i in range(N):
        bank[i, torch.randperm(D, generator=g)[:4]] = torch.randint(0, 2, (4,), generator=g).float() * 2 - 1
    bank[BOUNDARY] = bank[0].clone()
    fine = torch.randint(0, 6, (N,), generator=g)
    query = torch.cat([bank[BOUNDARY], bank[torch.randint(0, N, (12,), generator=g)] * 2])
    return query, bank, {"fine": fine, "coarse": fine // 2}


def worker(ctx):
    query, bank, labels = tied_problem()
    lo, hi = shard_bounds(N, ctx.world_size, ctx.rank)
    shard, mine = bank[lo:hi], {lv: lab[lo:hi] for lv, lab in labels.items()}
    rows = {}
    for k in KS:
        for ex in (None, EXCLUDE):
            q = bank[EXCLUDE] if ex is not None else query
            rows[(k, ex is not None)] = torch.cat([r for *_, r in knn_neighbours(q, shard, [], lo, k, ctx, chunk_size=5,
                                                                                 exclude=ex)])
    votes = {(lv, k, SIGMA) for lv in labels for k in KS}
    pass_preds, _ = evaluate_pass(query, shard, lo, mine, labels, NUM_CLASSES, ctx, votes=votes, ap_levels=["fine"],
                                  rankings={"cosine": Ranking()}, chunk_size=7)
    cfg = SimpleNamespace(eval=SimpleNamespace(k=5, knn_backend="torch"), eval_sigma=SIGMA)
    online = online_knn(_Memory(shard, lo), labels, VAL, cfg, ctx)
    return {"rows": rows, "pass": pass_preds,
            "predict": knn_predict(query, shard, mine, lo, KS, SIGMA, NUM_CLASSES, ctx, chunk_size=6),
            "choose_k": choose_k(shard, mine, lo, VAL, KS, SIGMA, NUM_CLASSES, ctx, chunk_size=4),
            "online": online}


class _Memory:
    """What online_knn reads of a (sharded) memory bank."""

    def __init__(self, bank, offset):
        self.bank, self.offset = bank, offset

    def __len__(self):
        return len(self.bank)


_RESULTS = {}


def _run(world_size):
    if world_size not in _RESULTS:
        _RESULTS[world_size] = [worker(DistContext())] if world_size == 1 else run_gloo(worker, world_size)
    return _RESULTS[world_size]


def test_the_problem_has_ties_that_decide_predictions():
    query, bank, labels = tied_problem()
    s = oracles.scores(query, bank)
    top = torch.sort(s, dim=1, descending=True).values
    assert (top[:, 4] == top[:, 5]).float().mean() > 0.5        # the 5th and 6th scores tie for most queries
    # the highest row first among ties would predict otherwise: the rule decides something
    differ = [k for k in KS if not torch.equal(oracles.knn_predict(query, bank, labels["fine"], k, SIGMA, 6),
                                                oracles.knn_predict(query, bank.flip(0), labels["fine"].flip(0), k,
                                                                    SIGMA, 6))]
    assert differ, "no prediction depends on the order among ties"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_knn_ties_go_to_the_lower_global_row_at_every_world_size(world_size):
    query, bank, labels = tied_problem()
    results = _run(world_size)
    for res in results[1:]:                                     # every rank returns the same
        assert all(torch.equal(res["rows"][key], results[0]["rows"][key]) for key in res["rows"])
        assert res["choose_k"] == results[0]["choose_k"] and res["online"] == results[0]["online"]
    got = results[0]
    for (k, ex), rows in got["rows"].items():                   # the neighbours themselves, in order
        ref = oracles.neighbours(bank[EXCLUDE], bank, k, EXCLUDE)[1] if ex else oracles.neighbours(query, bank, k)[1]
        assert torch.equal(rows, ref), (k, ex)
    for lv, lab in labels.items():
        for k in KS:
            ref = oracles.knn_predict(query, bank, lab, k, SIGMA, NUM_CLASSES[lv])
            assert torch.equal(got["predict"][(lv, k)], ref), (lv, k)
            assert torch.equal(got["pass"][(lv, k, SIGMA)], ref), (lv, k)
    assert got["choose_k"] == oracles.choose_k(bank, labels, VAL, KS, SIGMA, NUM_CLASSES)
    for lv, lab in labels.items():
        hits = oracles.knn_predict(bank[VAL], bank, lab, 5, SIGMA, NUM_CLASSES[lv], exclude=VAL) == lab[VAL]
        assert got["online"][f"online_knn_top1/{lv}"] == float(hits.float().mean())


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_search_ranking_puts_the_lower_row_first_among_ties(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    from orchestrator.search import rank
    query, bank, _ = tied_problem()
    names = ["a" if i % 3 else "b" for i in range(N)]
    for coarse in (None, "b"):
        order, scores = rank(query[3].numpy(), bank.numpy(), names, coarse, N, backend)   # every row: no cut tie
        keyed = oracles.scores(query[3:4], bank)[0].double().numpy()
        if coarse is not None:
            keyed = keyed + np.where(np.asarray(names) == coarse, 100.0, -100.0)
        assert order.tolist() == np.lexsort((np.arange(N), -keyed)).tolist()
