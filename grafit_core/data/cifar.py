"""CIFAR-100 from torchvision's on-disk format: levels ["superclass", "class"].

`root` is the folder holding `cifar-100-python/` (what `torchvision.datasets.CIFAR100(root,
download=True)` leaves behind) or that folder itself. It contains three pickles:
`train` and `test` (keys b"data": N x 3072 uint8 rows, the R, G then B planes of a 32 x 32
image, b"fine_labels", b"coarse_labels", b"filenames") and `meta` (b"fine_label_names",
b"coarse_label_names"). The 20 superclasses and 100 classes are the official ones:
names from `meta`, each image's two labels from its split file. Train = the train split,
query = the test split.
"""
from __future__ import annotations

import os
import pickle

import numpy as np
import torch

from grafit_core.data.hierarchy import build_hierarchy
from grafit_core.data.images import TensorCollection
from grafit_core.errors import DataError

LEVELS = ["superclass", "class"]
FOLDER = "cifar-100-python"
SIDE = 32


def _folder(root: str) -> str:
    """Accept both the parent of `cifar-100-python/` and the folder itself."""
    nested = os.path.join(root, FOLDER)
    return nested if os.path.isdir(nested) else root


class _DataOnly(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only: a pickle naming any other callable (the way a
    malicious file runs code) is refused instead of executed."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"), ("copyreg", "_reconstructor"),
               ("builtins", "object")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not plain data)")
        return super().find_class(module, name)


def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise DataError(f"CIFAR-100: missing file {path}")
    try:
        with open(path, "rb") as f:
            # The official pickles were written by Python 2: bytes keys, latin1 strings.
            return _DataOnly(f, encoding="bytes").load()
    except Exception as e:  # a truncated, foreign or unsafe file: say which one
        raise DataError(f"CIFAR-100: cannot read {path}: {e}") from e


def _get(d: dict, key: str, path: str):
    for k in (key.encode(), key):  # bytes keys in the real files, str if re-pickled by Python 3
        if k in d:
            return d[k]
    raise DataError(f"CIFAR-100: {path} has no key {key!r}")


def _names(meta: dict, key: str, path: str) -> list[str]:
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in _get(meta, key, path)]


def _read_split(path: str, fine_names: list[str], coarse_names: list[str]):
    """-> (N x 3 x 32 x 32 uint8 tensor, N rows of (superclass name, class name))."""
    d = _unpickle(path)
    data = np.asarray(_get(d, "data", path))
    fine = np.asarray(_get(d, "fine_labels", path), dtype=np.int64)
    coarse = np.asarray(_get(d, "coarse_labels", path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE:
        raise DataError(f"CIFAR-100: {path}: b'data' must be N x {3 * SIDE * SIDE} uint8, "
                        f"got {data.shape} {data.dtype}")
    if not len(data) == len(fine) == len(coarse):
        raise DataError(f"CIFAR-100: {path}: {len(data)} images but {len(fine)} fine and "
                        f"{len(coarse)} coarse labels")
    for labels, names, key in ((fine, fine_names, "fine_labels"),
                               (coarse, coarse_names, "coarse_labels")):
        bad = labels[(labels < 0) | (labels >= len(names))]
        if len(bad):
            raise DataError(f"CIFAR-100: {path}: {key} contains {int(bad[0])}, "
                            f"but meta names only {len(names)} classes")
    images = torch.from_numpy(data.reshape(-1, 3, SIDE, SIDE).copy())
    rows = [(coarse_names[c], fine_names[f]) for c, f in zip(coarse, fine)]
    return images, rows


def load_cifar100(root: str, *, cache_size: int | None = None):
    """-> (train, query) TensorCollections of 3 x 32 x 32 images, levels superclass > class.

    `cache_size` is accepted so every image dataset takes the same options; CIFAR is
    always held in memory at its native 32 x 32, so any other value is refused.
    """
    if cache_size not in (None, SIDE):
        raise DataError(f"CIFAR-100: cache_size={cache_size}: images are kept at {SIDE} x {SIDE}")
    folder = _folder(root)
    meta_path = os.path.join(folder, "meta")
    meta = _unpickle(meta_path)
    fine_names = _names(meta, "fine_label_names", meta_path)
    coarse_names = _names(meta, "coarse_label_names", meta_path)
    train_images, train_rows = _read_split(os.path.join(folder, "train"), fine_names, coarse_names)
    query_images, query_rows = _read_split(os.path.join(folder, "test"), fine_names, coarse_names)

    # One hierarchy over both splits, so a class filed under two superclasses anywhere is caught.
    hierarchy, labels = build_hierarchy(LEVELS, train_rows + query_rows, source=f"CIFAR-100 {folder}")
    n = len(train_rows)
    missing = set(labels["class"][n:].tolist()) - set(labels["class"][:n].tolist())
    if missing:
        name = hierarchy.classes["class"][min(missing)]
        raise DataError(f"CIFAR-100: class {name!r} is in the test split but has no training image")
    train = TensorCollection("cifar100/train", hierarchy,
                             {lv: labels[lv][:n] for lv in LEVELS}, train_images)
    query = TensorCollection("cifar100/query", hierarchy,
                             {lv: labels[lv][n:] for lv in LEVELS}, query_images)
    return train, query
