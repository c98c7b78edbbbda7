"""Datasets: a registry of loaders, each returning (train collection, query collection).

A loader is `load_x(root, **options) -> (Collection, Collection)` with keyword-only options;
the config's `data.options` are checked against its signature before anything is loaded.
"""
from __future__ import annotations

import inspect

from grafit_core.data.cifar import load_cifar100
from grafit_core.data.folders import load_folders, load_omniglot
from grafit_core.data.hierarchy import NONE_LEVEL, Collection, Hierarchy, build_hierarchy
from grafit_core.data.imagenet import load_imagenet
from grafit_core.data.inaturalist import load_inaturalist
from grafit_core.data.synthetic import load_synthetic
from grafit_core.data.transfer import load_flowers102, load_food101, load_stanford_cars
from grafit_core.errors import ConfigError

# name -> loader (a loader's optional dependencies, e.g. scipy, are imported inside it)
DATASETS = {
    "folders": load_folders,
    "omniglot": load_omniglot,
    "synthetic": load_synthetic,
    "cifar100": load_cifar100,
    "inaturalist": load_inaturalist,
    "imagenet": load_imagenet,
    "flowers102": load_flowers102,
    "stanford_cars": load_stanford_cars,
    "food101": load_food101,
}


def get_loader(name: str):
    if name not in DATASETS:
        raise ConfigError(f"data.name: unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def check_options(name: str, options: dict, where: str = "data.options") -> None:
    """Raise ConfigError naming the key when `options` does not fit the loader's signature."""
    params = inspect.signature(get_loader(name)).parameters
    allowed = {k for k, p in params.items() if p.kind == p.KEYWORD_ONLY}
    for key in options:
        if key not in allowed:
            raise ConfigError(f"{where}.{key}: unknown option for dataset {name!r}; "
                              f"allowed: {', '.join(sorted(allowed))}")
    missing = [k for k, p in params.items()
               if p.kind == p.KEYWORD_ONLY and p.default is p.empty and k not in options]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}: required for dataset {name!r}")


def load_dataset(name: str, root: str | None, options: dict) -> tuple[Collection, Collection]:
    check_options(name, options)
    return get_loader(name)(root, **options)


def prepare_data(data_cfg) -> tuple[Collection, Collection]:
    """Load both collections and check every image up front (header, size, truncation), so a
    broken file is refused, or dropped by `check_images: skip`, before any training starts and
    every worker then sees the same dataset."""
    train, query = load_dataset(data_cfg.name, data_cfg.root, data_cfg.options)
    return train.check_images(data_cfg.check_images), query.check_images(data_cfg.check_images)


__all__ = ["prepare_data", "DATASETS", "NONE_LEVEL", "Collection", "Hierarchy", "build_hierarchy",
           "check_options", "get_loader", "load_dataset"]
