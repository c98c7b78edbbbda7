"""Torch datasets over a Collection: T augmented views for training, one clean view for evaluation.

The training dataset is given the labels of the training level only, so finer labels can
never reach a training step (see the leakage test).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from grafit_core.data.hierarchy import Collection


class TrainViews(Dataset):
    """Item i -> (views T x C x H x W, label at the training level, global index i)."""

    def __init__(self, collection: Collection, labels: np.ndarray, transform: Callable, num_views: int):
        assert len(labels) == len(collection)
        self.collection = collection
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.transform = transform
        self.num_views = num_views

    def __len__(self) -> int:
        return len(self.collection)

    def __getitem__(self, i: int):
        img = self.collection.image(i)
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
