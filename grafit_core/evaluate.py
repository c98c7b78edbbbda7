"""Evaluation protocol (paper §3.2-3.3, §4.1): kNN top-1 and retrieval mAP at every test level,
with cosine, conditioned (eq. 5, p_c from the model) and oracle ranking.

The collection is the training set embedded with the final weights; k is chosen per test
level on a fixed validation subset of the collection (leave-one-out), never on the queries.
"""
from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import torch
import torch.nn.functional as F

from grafit_core.config import Config, with_overrides
from grafit_core.data import NONE_LEVEL, Collection
from grafit_core.errors import ConfigError, DataError
from grafit_core.distributed import DistContext
from grafit_core.losses import at_least_fp32
from grafit_core.metrics import Ranking, choose_k, evaluate_pass, knn_predict, replicate_rows

VALIDATION_SEED = 0   # the same validation subset for every run, so sweeps compare like with like
ONLINE_K = 20         # k of the per-epoch online kNN when eval.k is `auto`


def check_against_data(cfg: Config, train: Collection) -> list[str]:
    """Checks that need the dataset; returns the test levels. Raises ConfigError naming the key."""
    src = cfg.source or "<config>"
    h = train.hierarchy
    for key, level in [("data.train_level", cfg.data.train_level)] + \
            [("data.test_levels", lv) for lv in (cfg.data.test_levels or [])]:
        try:
            h.check_level(level)
        except DataError as err:
            raise ConfigError(f"{src}: {key}: {err}") from None
    if isinstance(cfg.eval.k, int) and cfg.eval.k > len(train) - 1:
        raise ConfigError(f"{src}: eval.k: {cfg.eval.k} is larger than the collection "
                          f"({len(train)} images, {len(train) - 1} neighbours at most)")
    if cfg.eval.knn_backend == "faiss" and importlib.util.find_spec("faiss") is None:
        raise ConfigError(f"{src}: eval.knn_backend: faiss is not installed (pip install faiss-cpu), or use torch")
    if cfg.optim.batch_size > len(train):
        raise ConfigError(f"{src}: optim.batch_size: {cfg.optim.batch_size} is larger than the "
                          f"training collection ({len(train)} images)")
    return list(cfg.data.test_levels or h.levels)


def validation_indices(n: int, size: int) -> torch.Tensor:
    """A fixed subset of the training collection (sorted global indices)."""
    rng = np.random.default_rng(VALIDATION_SEED)
    return torch.as_tensor(np.sort(rng.permutation(n)[:min(size, n)]))


def _num_classes(labels: dict[str, torch.Tensor]) -> dict[str, int]:
    return {lv: int(lab.max()) + 1 for lv, lab in labels.items()}


@torch.no_grad()
def online_knn(memory, level_labels: dict[str, torch.Tensor], val_idx: torch.Tensor,
               cfg: Config, ctx: DistContext) -> dict[str, float]:
    """kNN top-1 of the validation subset against the current memory (leave-one-out), per level.
    Comparable across sigma, tau and loss weights, unlike the losses. Works on the memory shard."""
    if not level_labels:
        return {}
    n = len(next(iter(level_labels.values())))
    k = min(cfg.eval.k if isinstance(cfg.eval.k, int) else ONLINE_K, n - 1)
    lo, hi = memory.offset, memory.offset + len(memory)
    shard_labels = {lv: lab[lo:hi] for lv, lab in level_labels.items()}
    bank = memory.bank.to(at_least_fp32(memory.bank.dtype))   # a bf16 memory: in fp32
    val = replicate_rows(bank, lo, val_idx, ctx)
    preds = knn_predict(val, bank, shard_labels, lo, [k], cfg.eval_sigma, _num_classes(level_labels), ctx,
                        exclude=val_idx, backend=cfg.eval.knn_backend)
    return {f"online_knn_top1/{lv}": float((preds[(lv, k)].cpu() == lab[val_idx]).float().mean())
            for lv, lab in level_labels.items()}


def eval_variants(cfg: Config) -> list[tuple[str, Config]]:
    """("", cfg), then (suffix, config) for each combination of eval.grid values.
    Suffixes name the values, e.g. "k10_esigma0.1", and are appended to metric keys."""
    grid = cfg.eval.grid
    short = {"eval.k": "k", "eval.sigma": "esigma", "eval.k_candidates": "kcand", "eval.knn_backend": "knn"}
    out = [("", cfg)]                          # the config's own values, unsuffixed
    for combo in itertools.product(*grid.values()):
        overrides = dict(zip(grid, combo))
        suffix = "_".join(f"{short[k]}{'-'.join(map(str, v)) if isinstance(v, list) else v}"
                          for k, v in overrides.items())
        out.append((suffix, with_overrides(cfg, overrides)))
    return out


@torch.no_grad()
def evaluate(cfg: Config, shard: torch.Tensor, offset: int, train: Collection, queries: torch.Tensor,
             query: Collection, test_levels: list[str], ctx: DistContext = DistContext(),
             query_logits=None) -> dict[str, float]:
    """Every metric at every test level from one set of embeddings, for every evaluation-only
    variant (eval.grid). `shard` holds the collection's rows [offset, offset + len(shard))
    (all of it in one process); queries are replicated. k is chosen first (leave-one-out on the
    validation subset); then ONE pass over the collection (metrics.evaluate_pass) scores each
    chunk of queries once and derives kNN top-1 for every (level, k, sigma) and the AP of every
    level under cosine, conditioned (per distinct p_c) and oracle ranking."""
    level = cfg.data.train_level
    levels = list(dict.fromkeys(test_levels + ([level] if level != NONE_LEVEL else [])))
    lo, hi = offset, offset + len(shard)
    bank_labels = {lv: torch.as_tensor(train.labels_at(lv))[lo:hi] for lv in levels}
    query_labels = {lv: torch.as_tensor(query.labels_at(lv)) for lv in levels}
    nc = {lv: train.num_classes(lv) for lv in levels}
    plans = _plans(cfg, shard, offset, len(train), bank_labels, levels, nc, ctx)
    votes = {(lv, chosen[lv], sigma) for _, sigma, chosen in plans for lv in test_levels}
    rankings = {"cosine": Ranking()}
    if level != NONE_LEVEL:
        rankings["oracle"] = Ranking(level, probs=F.one_hot(query_labels[level], nc[level]).float())
        if query_logits is not None:         # p_c: the head's softmax (CE) ...
            rankings["cond"] = Ranking(level, probs=F.softmax(query_logits.float(), dim=1))
        for _, sigma, chosen in plans:      # ... or eq. 6 with the training-level labels
            votes.add((level, chosen[level], sigma))
            if query_logits is None:
                rankings[_cond_name(chosen[level], sigma)] = Ranking(level, k=chosen[level], sigma=sigma)
    preds, aps = evaluate_pass(queries, shard, offset, bank_labels, query_labels, nc, ctx, votes=votes,
                               ap_levels=test_levels, rankings=rankings)
    metrics: dict[str, float] = {}
    for lv in test_levels:
        ap = aps[("cosine", lv)]
        metrics[f"map_cosine/{lv}"], metrics[f"map_skipped/{lv}"] = _mean(ap[:, 0]), int(torch.isnan(ap[:, 0]).sum())
        metrics[f"map_at_r/{lv}"] = _mean(ap[:, 1])
        if level != NONE_LEVEL:
            metrics[f"map_oracle/{lv}"] = _mean(aps[("oracle", lv)][:, 0])
    for suffix, sigma, chosen in plans:
        part = {}
        for lv in test_levels:
            part[f"k/{lv}"] = chosen[lv]
            part[f"knn_top1/{lv}"] = float((preds[(lv, chosen[lv], sigma)].cpu() == query_labels[lv]).float().mean())
        if level != NONE_LEVEL:
            cond = "cond" if query_logits is not None else _cond_name(chosen[level], sigma)
            coarse = query_logits.argmax(1) if query_logits is not None else preds[(level, chosen[level], sigma)]
            part[f"coarse_top1/{level}"] = float((coarse.cpu() == query_labels[level]).float().mean())
            part.update({f"map_cond/{lv}": _mean(aps[(cond, lv)][:, 0]) for lv in test_levels})
        metrics.update({f"{k}/{suffix}" if suffix else k: v for k, v in part.items()})
    return metrics


@torch.no_grad()
def evaluate_unseen(cfg: Config, shard: torch.Tensor, offset: int, coll: Collection, queries: torch.Tensor,
                    query: Collection, test_levels: list[str], ks: dict[str, int],
                    ctx: DistContext = DistContext()) -> dict[str, float]:
    """The coarse classes held out of training (data.unseen): their queries against their own
    collection, in one pass, at every test level: kNN top-1 with the k chosen for that level on the
    seen collection (`ks`), mAP and MAP@R by cosine; keys `<metric>/<level>/unseen`. Conditioned and
    oracle mAP are not computed: p_c has no entry for a coarse class never trained on."""
    lo, hi = offset, offset + len(shard)
    bank_labels = {lv: torch.as_tensor(coll.labels_at(lv))[lo:hi] for lv in test_levels}
    query_labels = {lv: torch.as_tensor(query.labels_at(lv)) for lv in test_levels}
    nc = {lv: coll.num_classes(lv) for lv in test_levels}
    votes = {(lv, ks[lv], cfg.eval_sigma) for lv in test_levels}
    preds, aps = evaluate_pass(queries, shard, offset, bank_labels, query_labels, nc, ctx, votes=votes,
                               ap_levels=test_levels, rankings={"cosine": Ranking()})
    metrics = {}
    for lv in test_levels:
        ap = aps[("cosine", lv)]
        metrics[f"knn_top1/{lv}/unseen"] = float((preds[(lv, ks[lv], cfg.eval_sigma)].cpu()
                                                   == query_labels[lv]).float().mean())
        metrics[f"map_cosine/{lv}/unseen"], metrics[f"map_at_r/{lv}/unseen"] = _mean(ap[:, 0]), _mean(ap[:, 1])
    return metrics


def _cond_name(k: int, sigma: float) -> str:
    return f"cond_k{k}_s{sigma}"


def _plans(cfg, shard, offset, n, bank_labels, levels, nc, ctx) -> list[tuple[str, float, dict]]:
    """(suffix, voting sigma, {level: k}) per evaluation variant; k `auto` is chosen per level by
    leave-one-out top-1 on the validation subset (one validation pass per distinct setting)."""
    plans, chosen_by = [], {}
    for suffix, vcfg in eval_variants(cfg):
        sigma = vcfg.eval_sigma
        if vcfg.eval.k == "auto":
            candidates = [k for k in vcfg.eval.k_candidates if k < n] or [n - 1]
            key = (tuple(candidates), sigma, vcfg.eval.val_size, vcfg.eval.knn_backend)
            if key not in chosen_by:
                picked = choose_k(shard, bank_labels, offset, validation_indices(n, vcfg.eval.val_size),
                                  candidates, sigma, nc, ctx, backend=vcfg.eval.knn_backend)
                chosen_by[key] = {lv: best for lv, (best, _) in picked.items()}
            chosen = chosen_by[key]
        else:
            chosen = {lv: vcfg.eval.k for lv in levels}
        plans.append((suffix, sigma, chosen))
    return plans


def _mean(ap: torch.Tensor) -> float:
    ok = ~torch.isnan(ap)
    return float(ap[ok].mean()) if ok.any() else float("nan")
