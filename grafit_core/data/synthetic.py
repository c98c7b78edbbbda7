"""A tiny synthetic hierarchy for fast tests of the training loop.

Every node of a tree (branching[l] children per node at level l) has a smooth random
prototype; a sample's image is the sum of its ancestors' prototypes plus noise. Finer
prototypes are weaker, so siblings look alike (same coarse part) yet stay separable.
"""
from __future__ import annotations

import itertools
import string

import torch
import torch.nn.functional as F

from grafit_core.data.hierarchy import build_hierarchy
from grafit_core.data.images import TensorCollection
from grafit_core.errors import ConfigError

_DECAY = 0.7      # amplitude ratio of a child's prototype to its parent's
_GRID = 4         # prototypes are random on a 4 x 4 grid, upsampled: smooth, crop-robust


def tree_paths(branching: list[int]) -> list[list[str]]:
    """Every leaf's class name at every level: [["a1", "a1.b1", ...], ...]."""
    leaves = []
    for ids in itertools.product(*[range(1, b + 1) for b in branching]):
        parts = [f"{string.ascii_lowercase[l]}{i}" for l, i in enumerate(ids)]
        leaves.append([".".join(parts[:l + 1]) for l in range(len(parts))])
    return leaves


def load_synthetic(root: str | None = None, *, branching: list[int] = [3, 3, 3],
                   per_class: int = 12, queries_per_class: int = 4, image_size: int = 16,
                   channels: int = 3, noise: float = 0.3, seed: int = 0
                   ) -> tuple[TensorCollection, TensorCollection]:
    """(train, query) TensorCollections; levels l0, l1, ... (coarse -> fine). `root` is ignored."""
    branching = list(branching)
    if not branching or len(branching) > 26 or min(branching) < 1:
        raise ConfigError(f"data.options.branching: need 1 to 26 positive entries, got {branching}")
    if per_class < 1 or queries_per_class < 0 or image_size < 1 or channels not in (1, 3):
        raise ConfigError("data.options: per_class >= 1, queries_per_class >= 0, "
                          "image_size >= 1 and channels in (1, 3) are required")
    g = torch.Generator().manual_seed(seed)
    levels = [f"l{l}" for l in range(len(branching))]
    leaves = tree_paths(branching)
    nodes = sorted({name for leaf in leaves for name in leaf}, key=lambda n: (n.count("."), n))
    grid = torch.randn(len(nodes), channels, _GRID, _GRID, generator=g)
    protos = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=False)
    protos *= torch.tensor([_DECAY ** n.count(".") for n in nodes]).view(-1, 1, 1, 1)
    index = {n: i for i, n in enumerate(nodes)}
    # (leaves, C, S, S): the sum of each leaf's ancestors' prototypes.
    means = torch.stack([protos[[index[n] for n in leaf]].sum(0) for leaf in leaves])

    def sample(k: int) -> torch.Tensor:
        x = means.repeat_interleave(k, 0)
        x = x + noise * torch.randn(x.shape, generator=g)
        # Map roughly [-2, 2] to [0, 255]; beyond that saturates, like an over-exposed photo.
        return (x * 64 + 128).round().clamp(0, 255).to(torch.uint8)

    train_x, query_x = sample(per_class), sample(queries_per_class)
    names = [leaf for leaf in leaves for _ in range(per_class)]
    names += [leaf for leaf in leaves for _ in range(queries_per_class)]
    hierarchy, labels = build_hierarchy(levels, names, source="synthetic")
    n = len(leaves) * per_class
    train = TensorCollection("synthetic-train", hierarchy, {k: v[:n] for k, v in labels.items()}, train_x)
    query = TensorCollection("synthetic-query", hierarchy, {k: v[n:] for k, v in labels.items()}, query_x)
    return train, query
