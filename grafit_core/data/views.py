"""Torch datasets over a Collection: T augmented views for training, one clean view for evaluation;
the order training sees them in (GlobalBatches).

The training dataset is given the labels of the training level only, so finer labels can
never reach a training step (see the leakage test). Nothing a training step sees depends on the
world size or on where an epoch was resumed: the order is one permutation per epoch, and each
sample's augmentations are drawn from its own seed (seed, epoch, index).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from grafit_core.data.hierarchy import Collection


class TrainViews(Dataset):
    """Item i -> (views T x C x H x W, label at the training level, global index i)."""

    def __init__(self, collection: Collection, labels: np.ndarray, transform: Callable, num_views: int,
                 seed: int = 0):
        assert len(labels) == len(collection)
        self.collection = collection
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.num_views = num_views
        self.seed, self.epoch = seed, 0          # set_epoch before each epoch (loader workers copy it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.collection)

    def __getitem__(self, i: int):
        img = self.collection.image(i)
        # the sample's own stream: the same views whichever worker, rank or resumed run draws them
        seed = np.random.SeedSequence([self.seed, self.epoch, int(i)]).generate_state(1, np.uint64)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            views = torch.stack([self.transform(img) for _ in range(self.num_views)])
        return views, self.labels[i], i


class EvalImages(Dataset):
    """Item i -> (image C x H x W after the evaluation transform, global index i)."""

    def __init__(self, collection: Collection, transform: Callable):
        self.collection = collection
        self.transform = transform

    def __len__(self) -> int:
        return len(self.collection)

    def __getitem__(self, i: int):
        return self.transform(self.collection.image(i)), i


class GlobalBatches(Sampler):
    """This rank's share of each global batch: one seeded permutation of the N samples per epoch, cut
    into N // batch_size global batches (the same dropped tail at every world size), rank r taking
    the r-th of W equal slices of each. set_epoch(epoch, start) skips the first `start` global
    batches: a run resumed inside an epoch, at any world size, sees each remaining sample once."""

    def __init__(self, n: int, batch_size: int, world_size: int, rank: int, seed: int):
        if batch_size % world_size:
            raise ValueError(f"optim.batch_size {batch_size} is not divisible by {world_size} workers")
        self.n, self.batch_size, self.world_size, self.rank, self.seed = n, batch_size, world_size, rank, seed
        self.num_batches = n // batch_size      # global batches per epoch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def permutation(self) -> torch.Tensor:
        """This epoch's order of the N samples (the same at every world size)."""
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def __len__(self) -> int:
        return self.num_batches - self.start

    def __iter__(self):
        perm, share = self.permutation(), self.batch_size // self.world_size
        for b in range(self.start, self.num_batches):
            first = b * self.batch_size + self.rank * share
            yield perm[first:first + share].tolist()
