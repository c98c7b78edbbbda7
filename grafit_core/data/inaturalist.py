"""iNaturalist 2018 / 2019 from the competitions' COCO-style JSON annotations.

`root` holds `train{version}.json` and `val{version}.json` and the image folders their
`file_name`s point into (e.g. `train_val2018/Plantae/7477/<hash>.jpg`, relative to root).
Each JSON has "images" (id, file_name, width, height), "annotations" (image_id,
category_id) and "categories" (id, name and the rank keys kingdom, phylum, class, order,
family, genus; 2018 adds "supercategory", which is not a rank and is not used). The
species of a category is its "name". Levels are any subset of RANKS, coarse -> fine; a
class at a rank is identified by its name at that rank (qualified by its kingdom when the
name is used in two kingdoms), so the taxonomy must be a tree (a genus filed under two
families is refused, naming it). Only categories with at least
one training image become classes. Train = train json, query = val json; the images are
decoded from disk (or cached at cache_size x cache_size, see FileCollection).
"""
from __future__ import annotations

import json
import os

from grafit_core.data.hierarchy import build_hierarchy
from grafit_core.data.images import FileCollection
from grafit_core.errors import DataError

RANKS = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]
SPECIES_KEY = "name"  # the species rank is stored as the category's name


def _check_levels(levels) -> list[str]:
    levels = list(levels)
    for level in levels:
        if level not in RANKS:
            raise DataError(f"iNaturalist: unknown rank {level!r} in levels; ranks: {', '.join(RANKS)}")
    if len(set(levels)) != len(levels) or levels != sorted(levels, key=RANKS.index):
        raise DataError(f"iNaturalist: levels must be distinct ranks in coarse -> fine order "
                        f"({' > '.join(RANKS)}), got {levels}")
    if not levels:
        raise DataError("iNaturalist: levels must name at least one rank")
    return levels


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"iNaturalist: missing annotation file {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"iNaturalist: cannot read {path}: {e}") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"iNaturalist: {path} has no {key!r} list")
    return data


def _kingdom_homonyms(categories: list, levels: list[str]) -> dict[str, set]:
    """Names used in more than one kingdom at a rank (the zoological and botanical codes are
    independent: the genus Morus is a gannet and a mulberry) -> they get "(kingdom)" appended."""
    kingdoms: dict[tuple, set] = {}
    for cat in categories:
        for level in levels:
            key = SPECIES_KEY if level == "species" else level
            if level != "kingdom" and key in cat and "kingdom" in cat:
                kingdoms.setdefault((level, str(cat[key])), set()).add(str(cat["kingdom"]))
    return {level_name for level_name, ks in kingdoms.items() if len(ks) > 1}


def _category_names(categories: list, levels: list[str], path: str) -> dict:
    """category id -> tuple of its class name at each level (a missing rank key is refused)."""
    out = {}
    homonyms = _kingdom_homonyms(categories, levels)
    for cat in categories:
        row = []
        for level in levels:
            key = SPECIES_KEY if level == "species" else level
            if key not in cat:
                raise DataError(f"iNaturalist: {path}: category {cat.get('id')!r} has no {key!r} "
                                f"key, needed for level {level!r}")
            name = str(cat[key])
            row.append(f"{name} ({cat['kingdom']})" if (level, name) in homonyms else name)
        out[cat["id"]] = tuple(row)
    return out


def _read_split(path: str, root: str, levels: list[str]):
    """-> (image paths, rows of class names at each level), in the JSON's image order."""
    data = _read_json(path)
    names = _category_names(data["categories"], levels, path)
    category_of = {}
    for ann in data["annotations"]:
        image_id, cat = ann.get("image_id"), ann.get("category_id")
        if cat not in names:
            raise DataError(f"iNaturalist: {path}: annotation of image {image_id!r} has "
                            f"category_id {cat!r}, which is not in 'categories'")
        if category_of.setdefault(image_id, cat) != cat:
            raise DataError(f"iNaturalist: {path}: image {image_id!r} has two categories "
                            f"{category_of[image_id]!r} and {cat!r}")
    paths, rows = [], []
    for img in data["images"]:
        if img.get("id") not in category_of:
            raise DataError(f"iNaturalist: {path}: image {img.get('id')!r} "
                            f"({img.get('file_name')}) has no annotation")
        paths.append(os.path.join(root, img["file_name"]))
        rows.append(names[category_of.pop(img["id"])])
    if category_of:  # annotations left over point at images that are not listed
        raise DataError(f"iNaturalist: {path}: annotation for image id "
                        f"{next(iter(category_of))!r}, which is not in 'images'")
    return paths, rows


def load_inaturalist(root: str, *, version: str = "2018",
                     levels: list[str] = ["kingdom", "phylum", "class", "order", "family",
                                          "genus", "species"],
                     cache_size: int | None = None):
    """-> (train, query) FileCollections of RGB images labelled at `levels` (a subset of RANKS)."""
    levels = _check_levels(levels)  # copies: the mutable default is never modified
    version = str(version)
    train_paths, train_rows = _read_split(os.path.join(root, f"train{version}.json"), root, levels)
    query_paths, query_rows = _read_split(os.path.join(root, f"val{version}.json"), root, levels)

    # Classes come from the images, not the category list, so no class is empty; building
    # over both splits checks that val agrees with the tree seen in train.
    hierarchy, labels = build_hierarchy(levels, train_rows + query_rows,
                                        source=f"iNaturalist {version} ({root})")
    n, finest = len(train_rows), levels[-1]
    missing = set(labels[finest][n:].tolist()) - set(labels[finest][:n].tolist())
    if missing:
        name = hierarchy.classes[finest][min(missing)]
        raise DataError(f"iNaturalist: {finest} {name!r} has validation images but no training image")
    train = FileCollection(f"inaturalist{version}/train", hierarchy,
                           {lv: labels[lv][:n] for lv in levels}, train_paths, 3, cache_size)
    query = FileCollection(f"inaturalist{version}/query", hierarchy,
                           {lv: labels[lv][n:] for lv in levels}, query_paths, 3, cache_size)
    return train, query
