"""Datasets: a registry of loaders, each returning (train collection, query collection).

A loader is `load_x(root, **options) -> (Collection, Collection)` with keyword-only options;
the config's `data.options` are checked against its signature before anything is loaded.
"""
from __future__ import annotations

import inspect

import numpy as np

from grafit_core.data.cifar import load_cifar100
from grafit_core.data.folders import load_folders, load_omniglot
from grafit_core.data.hierarchy import NONE_LEVEL, Collection, Hierarchy, build_hierarchy
from grafit_core.data.images import split_collection
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


def prepare_data(data_cfg, source: str = "<config>") -> tuple[Collection, Collection]:
    """Load both collections and check every image up front (header, size, truncation), so a
    broken file is refused, or dropped by `check_images: skip`, before any training starts and
    every worker then sees the same dataset. With data.check_sample only a seeded sample of each
    collection is checked (at 10^8 images); a broken file outside it raises DataError when decoded.
    With data.unseen, the seen part of each (hold_out)."""
    train, query = load_dataset(data_cfg.name, data_cfg.root, data_cfg.options)
    on_error, sample = data_cfg.check_images, data_cfg.check_sample
    train, query = train.check_images(on_error, sample), query.check_images(on_error, sample)
    return hold_out(train, query, data_cfg.unseen, source) if data_cfg.unseen.active else (train, query)


def held_out_classes(hierarchy: Hierarchy, unseen, source: str = "<config>") -> tuple[str, list[int]]:
    """(level, class ids) that data.unseen holds out: named, or a seeded fraction of the level's
    classes (at least one, never all). Raises ConfigError naming the key."""
    level = unseen.level or hierarchy.levels[0]
    if level not in hierarchy.levels:
        raise ConfigError(f"{source}: data.unseen.level: {level!r} is not a level of the dataset "
                          f"({', '.join(hierarchy.levels)})")
    names = hierarchy.classes[level]
    if len(names) < 2:
        raise ConfigError(f"{source}: data.unseen.level: {level!r} has {len(names)} class: nothing to hold out and "
                          f"still train on")
    if unseen.classes:
        unknown = [c for c in unseen.classes if c not in names]
        if unknown:
            raise ConfigError(f"{source}: data.unseen.classes: {unknown[0]!r} is not a class of level {level!r} "
                              f"(e.g. {', '.join(names[:3])})")
        ids = sorted({names.index(c) for c in unseen.classes})
    else:
        n = min(max(1, round(unseen.fraction * len(names))), len(names) - 1)
        ids = sorted(np.random.default_rng(unseen.seed).permutation(len(names))[:n].tolist())
    if len(ids) >= len(names):
        raise ConfigError(f"{source}: data.unseen.classes: every class of level {level!r} is held out; "
                          f"nothing is left to train on")
    return level, ids


def hold_out(train: Collection, query: Collection, unseen,
             source: str = "<config>") -> tuple[Collection, Collection]:
    """The collection and queries without the held-out classes; their images, split the same way,
    ride along as `train.unseen = (collection, queries)` for the evaluation. Labels keep their ids."""
    level, ids = held_out_classes(train.hierarchy, unseen, source)
    parts = {}
    for name, coll in (("train", train), ("query", query)):
        out = np.isin(coll.labels_at(level), ids)
        parts[name] = (split_collection(coll, np.nonzero(~out)[0].tolist(), coll.name),
                       split_collection(coll, np.nonzero(out)[0].tolist(), f"{coll.name} (unseen)"))
    if not len(parts["train"][1]) or not len(parts["query"][1]):
        raise ConfigError(f"{source}: data.unseen: the held-out classes of level {level!r} have no "
                          f"{'collection' if not len(parts['train'][1]) else 'query'} images")
    seen = parts["train"][0]
    seen.unseen = (parts["train"][1], parts["query"][1])
    return seen, parts["query"][0]


__all__ = ["prepare_data", "hold_out", "held_out_classes", "DATASETS", "NONE_LEVEL", "Collection", "Hierarchy",
           "build_hierarchy", "check_options", "get_loader", "load_dataset"]
