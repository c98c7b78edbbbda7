"""The paper's transfer sets (§4.6, Tables 6-8) in torchvision's on-disk layouts; one level, "class".

Flowers-102   root/flowers-102/{jpg/image_00001.jpg, imagelabels.mat, setid.mat}
              (labels 1-based; setid holds trnid / valid / tstid, 1-based image numbers)
Stanford Cars root/stanford_cars/{cars_train/, cars_test/, devkit/cars_meta.mat,
              devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat}
              (annotations with fname and a 1-based class; class_names in cars_meta.mat)
Food-101      root/food-101/{images/<class>/<id>.jpg, meta/classes.txt, meta/train.json, meta/test.json}
              (the json files map a class to its "class/id" image keys)

`root` may also be the dataset folder itself. Train = the official training split (Flowers-102:
train + val with `with_val`), query = the official test split.
"""
from __future__ import annotations

import json
import os

from grafit_core.data.hierarchy import build_hierarchy
from grafit_core.data.images import FileCollection
from grafit_core.errors import DataError

LEVEL = "class"


def _folder(root: str, name: str) -> str:
    nested = os.path.join(root, name)
    return nested if os.path.isdir(nested) else root


def _need(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise DataError(f"{what}: missing {path}")
    return path


def _loadmat(path: str, what: str) -> dict:
    import scipy.io
    try:
        return scipy.io.loadmat(_need(path, what), squeeze_me=True)
    except (ValueError, OSError, TypeError) as err:
        raise DataError(f"{what}: cannot read {path}: {err}") from None


def _key(mat: dict, key: str, path: str, what: str):
    if key not in mat:
        raise DataError(f"{what}: {path} has no {key!r}")
    import numpy as np
    return np.atleast_1d(mat[key])          # squeeze_me turns a one-element array into a scalar


def _collections(what: str, train, test, cache_size):
    """[(path, class name)] x 2 -> FileCollections sharing one hierarchy."""
    for split, items in (("train", train), ("test", test)):
        if not items:
            raise DataError(f"{what}: the {split} split is empty")
        for path, _ in items:
            _need(path, what)
    hierarchy, labels = build_hierarchy([LEVEL], [(c,) for _, c in train + test], source=what)
    n = len(train)
    return (FileCollection(f"{what}/train", hierarchy, {LEVEL: labels[LEVEL][:n]}, [p for p, _ in train], 3,
                           cache_size),
            FileCollection(f"{what}/query", hierarchy, {LEVEL: labels[LEVEL][n:]}, [p for p, _ in test], 3,
                           cache_size))


def load_flowers102(root: str, *, with_val: bool = True, cache_size: int | None = None):
    what = "Flowers-102"
    base = _folder(root, "flowers-102")
    labels_path, setid_path = os.path.join(base, "imagelabels.mat"), os.path.join(base, "setid.mat")
    labels = [int(x) for x in _key(_loadmat(labels_path, what), "labels", labels_path, what)]
    setid = _loadmat(setid_path, what)

    def split(*keys):
        items = []
        for key in keys:
            for i in _key(setid, key, setid_path, what):
                if not 1 <= int(i) <= len(labels):
                    raise DataError(f"{what}: {setid_path}: {key} lists image {int(i)}, beyond the "
                                    f"{len(labels)} labels of {labels_path}")
                items.append((os.path.join(base, "jpg", f"image_{int(i):05d}.jpg"), str(labels[int(i) - 1])))
        return items

    return _collections(what, split("trnid", "valid") if with_val else split("trnid"), split("tstid"), cache_size)


def load_stanford_cars(root: str, *, cache_size: int | None = None):
    what = "Stanford Cars"
    base = _folder(root, "stanford_cars")
    meta_path = os.path.join(base, "devkit", "cars_meta.mat")
    names = [str(n) for n in _key(_loadmat(meta_path, what), "class_names", meta_path, what)]

    def split(annos_path, images):
        items = []
        for ann in _key(_loadmat(annos_path, what), "annotations", annos_path, what):
            cls = int(ann["class"])
            if not 1 <= cls <= len(names):
                raise DataError(f"{what}: {annos_path}: image {ann['fname']} has class {cls}, beyond the "
                                f"{len(names)} classes of {meta_path}")
            items.append((os.path.join(base, images, str(ann["fname"])), names[cls - 1]))
        return items

    return _collections(what, split(os.path.join(base, "devkit", "cars_train_annos.mat"), "cars_train"),
                        split(os.path.join(base, "cars_test_annos_withlabels.mat"), "cars_test"), cache_size)


def load_food101(root: str, *, cache_size: int | None = None):
    what = "Food-101"
    base = _folder(root, "food-101")
    classes_path = _need(os.path.join(base, "meta", "classes.txt"), what)
    classes = [line.strip() for line in open(classes_path) if line.strip()]

    def split(name):
        path = _need(os.path.join(base, "meta", f"{name}.json"), what)
        try:
            listing = json.load(open(path))
        except json.JSONDecodeError as err:
            raise DataError(f"{what}: cannot read {path}: {err}") from None
        items = []
        for cls, keys in listing.items():
            if cls not in classes:
                raise DataError(f"{what}: {path}: class {cls!r} is not in {classes_path}")
            items += [(os.path.join(base, "images", f"{key}.jpg"), cls) for key in keys]
        return items

    return _collections(what, split("train"), split("test"), cache_size)
