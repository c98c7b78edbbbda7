"""A taxonomy of named levels (coarse -> fine) and a collection of images labelled at every level.

Every dataset loader returns `Collection`s that share one `Hierarchy`. The level `none`
(the paper's empty set: one class for everything, i.e. unsupervised) is always available.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from grafit_core.errors import DataError

NONE_LEVEL = "none"


@dataclass
class Hierarchy:
    """Class names per level and, for each level below the first, the parent of each class."""

    levels: list[str]                      # coarse -> fine, without `none`
    classes: dict[str, list[str]]          # level -> class names; label id = position
    parents: dict[str, np.ndarray] = field(default_factory=dict)  # level -> parent id at the level above

    def level_names(self) -> list[str]:
        return [NONE_LEVEL] + list(self.levels)

    def check_level(self, level: str, what: str = "level") -> str:
        if level not in self.level_names():
            raise DataError(f"{what} {level!r} is not a level of this dataset; "
                            f"available: {', '.join(self.level_names())}")
        return level

    def num_classes(self, level: str) -> int:
        self.check_level(level)
        return 1 if level == NONE_LEVEL else len(self.classes[level])

    def is_coarser(self, coarse: str, fine: str) -> bool:
        """True when `coarse` is strictly above `fine` (`none` is above everything)."""
        names = self.level_names()
        return names.index(self.check_level(coarse)) < names.index(self.check_level(fine))

    def ancestor_map(self, fine: str, coarse: str) -> np.ndarray:
        """(num_classes(fine),) id of each fine class's ancestor at level `coarse`."""
        self.check_level(fine)
        self.check_level(coarse)
        if coarse == NONE_LEVEL:
            return np.zeros(self.num_classes(fine), dtype=np.int64)
        if fine == NONE_LEVEL or self.levels.index(coarse) > self.levels.index(fine):
            raise DataError(f"level {coarse!r} is not above level {fine!r}")
        ids = np.arange(self.num_classes(fine), dtype=np.int64)
        level = fine
        while level != coarse:
            ids = self.parents[level][ids]
            level = self.levels[self.levels.index(level) - 1]
        return ids


def build_hierarchy(levels: Sequence[str], names: Sequence[Sequence[str]],
                    source: str = "dataset") -> tuple[Hierarchy, dict[str, np.ndarray]]:
    """Build a hierarchy from each sample's class name at every level (coarse -> fine).

    `names[i][l]` is sample i's class at `levels[l]`; a class name identifies the class
    within its level. Returns the hierarchy and the (N,) int64 labels of every level.
    Raises DataError naming the class when a class sits under two parents.
    """
    levels = list(levels)
    if NONE_LEVEL in levels or len(set(levels)) != len(levels):
        raise DataError(f"{source}: level names must be distinct and not {NONE_LEVEL!r}: {levels}")
    if len(names) == 0:
        raise DataError(f"{source}: no samples found")
    classes: dict[str, list[str]] = {}
    labels: dict[str, np.ndarray] = {}
    for l, level in enumerate(levels):
        column = [row[l] for row in names]
        classes[level] = sorted(set(column))
        index = {c: i for i, c in enumerate(classes[level])}
        labels[level] = np.fromiter((index[c] for c in column), dtype=np.int64, count=len(column))
    parents: dict[str, np.ndarray] = {}
    for l in range(1, len(levels)):
        fine, coarse = levels[l], levels[l - 1]
        parent = np.full(len(classes[fine]), -1, dtype=np.int64)
        for f, c in zip(labels[fine], labels[coarse]):
            if parent[f] == -1:
                parent[f] = c
            elif parent[f] != c:
                raise DataError(
                    f"{source}: class {classes[fine][f]!r} at level {fine!r} is under two parents "
                    f"at level {coarse!r}: {classes[coarse][parent[f]]!r} and {classes[coarse][c]!r}")
        parents[fine] = parent
    return Hierarchy(levels, classes, parents), labels


class Collection:
    """A set of images labelled at every level of a shared hierarchy.

    Subclasses implement `image(i)` (a uint8 tensor C x H x W) and may override
    `check_images()`. Sample i of a collection has global index i: the memory bank,
    samplers and metrics all use these indices.
    """

    unseen: Optional[tuple["Collection", "Collection"]] = None   # held-out classes (data.unseen): collection, queries

    def __init__(self, name: str, hierarchy: Hierarchy, labels: dict[str, np.ndarray]):
        self.name = name
        self.hierarchy = hierarchy
        self.labels = labels
        sizes = {len(v) for v in labels.values()}
        if len(sizes) > 1:
            raise DataError(f"{name}: label arrays of different lengths {sorted(sizes)}")

    def __len__(self) -> int:
        return len(next(iter(self.labels.values())))

    def labels_at(self, level: str) -> np.ndarray:
        self.hierarchy.check_level(level)
        if level == NONE_LEVEL:
            return np.zeros(len(self), dtype=np.int64)
        return self.labels[level]

    def num_classes(self, level: str) -> int:
        return self.hierarchy.num_classes(level)

    def image(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def check_images(self, on_error: str = "raise", sample: Optional[int] = None) -> "Collection":
        """Cheap up-front check of every image, or of a seeded sample of `sample` of them;
        returns self (nothing to check by default)."""
        return self
