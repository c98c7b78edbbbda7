"""Evaluation protocol (paper §3.2-3.3, §4.1): kNN top-1 and retrieval mAP at every test level,
with cosine, conditioned (eq. 5, p_c from the model) and oracle ranking.

The collection is the training set embedded with the final weights; k is chosen per test
level on a fixed validation subset of the collection (leave-one-out), never on the queries.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from grafit_core.config import Config
from grafit_core.data import NONE_LEVEL, Collection
from grafit_core.errors import ConfigError, DataError
from grafit_core.metrics import average_precisions, choose_k, knn_classify, knn_predict_multi

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
def online_knn(bank: torch.Tensor, level_labels: dict[str, torch.Tensor], val_idx: torch.Tensor,
               cfg: Config) -> dict[str, float]:
    """kNN top-1 of the validation subset against the current memory (leave-one-out), per level.
    Comparable across sigma, tau and loss weights, unlike the losses."""
    if not level_labels:
        return {}
    k = min(cfg.eval.k if isinstance(cfg.eval.k, int) else ONLINE_K, len(bank) - 1)
    preds = knn_predict_multi(bank[val_idx], bank, level_labels, [k], cfg.eval_sigma,
                              _num_classes(level_labels), exclude=val_idx)
    return {f"online_knn_top1/{lv}": float((preds[(lv, k)] == lab[val_idx]).float().mean())
            for lv, lab in level_labels.items()}


@torch.no_grad()
def evaluate(cfg: Config, bank: torch.Tensor, train: Collection, queries: torch.Tensor,
             query: Collection, test_levels: list[str], query_logits=None) -> dict[str, float]:
    """Every metric at every test level from one set of embeddings."""
    sigma, level = cfg.eval_sigma, cfg.data.train_level
    levels = list(dict.fromkeys(test_levels + ([level] if level != NONE_LEVEL else [])))
    bank_labels = {lv: torch.as_tensor(train.labels_at(lv)) for lv in levels}
    query_labels = {lv: torch.as_tensor(query.labels_at(lv)) for lv in levels}
    nc = {lv: train.num_classes(lv) for lv in levels}
    metrics: dict[str, float] = {}

    # ====== k per level: chosen on the validation subset (leave-one-out), or fixed ======
    if cfg.eval.k == "auto":
        candidates = [k for k in cfg.eval.k_candidates if k < len(bank)] or [len(bank) - 1]
        val_idx = validation_indices(len(bank), cfg.eval.val_size)
        chosen = {lv: best for lv, (best, _) in
                  choose_k(bank, bank_labels, val_idx, candidates, sigma, nc).items()}
    else:
        chosen = {lv: cfg.eval.k for lv in levels}

    # ====== on-the-fly classification (eq. 6) ======
    preds = knn_predict_multi(queries, bank, bank_labels, sorted(set(chosen.values())), sigma, nc)
    for lv in test_levels:
        metrics[f"k/{lv}"] = chosen[lv]
        metrics[f"knn_top1/{lv}"] = float((preds[(lv, chosen[lv])] == query_labels[lv]).float().mean())

    # ====== p_c for conditioned ranking: the head's softmax (CE) or eq. 6 with coarse labels ======
    coarse_probs = {}
    if level != NONE_LEVEL:
        if query_logits is not None:
            coarse_probs["cond"] = F.softmax(query_logits.float(), dim=1)
        else:
            coarse_probs["cond"] = knn_classify(queries, bank, bank_labels[level], chosen[level], sigma, nc[level])
        coarse_probs["oracle"] = F.one_hot(query_labels[level], nc[level]).float()
        metrics[f"coarse_top1/{level}"] = float((coarse_probs["cond"].argmax(1) == query_labels[level]).float().mean())

    # ====== category-level retrieval (§3.2): cosine, conditioned, oracle ======
    for lv in test_levels:
        ap = average_precisions(queries, query_labels[lv], bank, bank_labels[lv])
        metrics[f"map_cosine/{lv}"] = float(np.nanmean(ap.numpy())) if (~torch.isnan(ap)).any() else float("nan")
        metrics[f"map_skipped/{lv}"] = int(torch.isnan(ap).sum())
        for name, probs in coarse_probs.items():
            ap = average_precisions(queries, query_labels[lv], bank, bank_labels[lv],
                                    collection_coarse=bank_labels[level], query_coarse_probs=probs)
            metrics[f"map_{name}/{lv}"] = float(np.nanmean(ap.numpy())) if (~torch.isnan(ap)).any() else float("nan")
    return metrics
