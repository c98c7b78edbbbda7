"""ClusterFit+ (Yan et al. 2020, with Grafit's training recipe, paper §4.2):
train the CE baseline on the given labels, cluster its features with k-means, then
train a fresh CE network on the cluster ids. `method.clusters` sets k-means' k."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from grafit_core.methods.base import Method


def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """k-means on the unit sphere (cosine), k-means++ seeding; returns (N,) cluster ids."""
    x = F.normalize(x.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(len(x), (1,), generator=g)].squeeze(0)]
    best = torch.full((len(x),), 2.0)
    for _ in range(1, k):
        best = torch.minimum(best, 1 - x @ centers[-1])
        probs = best.clamp(min=0)
        idx = (torch.multinomial(probs, 1, generator=g) if probs.sum() > 0
               else torch.randint(len(x), (1,), generator=g))
        centers.append(x[idx].squeeze(0))
    c = torch.stack(centers)
    for _ in range(iters):
        assign = (x @ c.t()).argmax(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = torch.bincount(assign, minlength=k) == 0
        c = torch.where(empty[:, None], c, F.normalize(sums, dim=1))
    return (x @ c.t()).argmax(1)


class ClusterFitPlus(Method):
    defaults = {"w_knn": 0.0, "w_inst": 0.0, "w_ce": 1.0, "projector": "none"}

    @classmethod
    def prepare_labels(cls, cfg, labels: torch.Tensor, train_stage) -> torch.Tensor:
        features = train_stage("ce", labels)       # stage 1: the CE baseline on the given labels
        return spherical_kmeans(features, cfg.method.clusters, seed=cfg.seed)
