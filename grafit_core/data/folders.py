"""Nested folders where the path is the taxonomy: root/<level1>/<level2>/.../<image>.

The class at level l is the path prefix up to l ("Greek/character01" differs from
"Latin/character01"). Omniglot is one such tree, split by drawer; a product catalog
`<category>/<subcategory>/<item>.jpg` is another.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from grafit_core.data.hierarchy import build_hierarchy
from grafit_core.data.images import FileCollection
from grafit_core.errors import ConfigError, DataError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
OMNIGLOT_LEVELS = ["alphabet", "character"]


def scan_tree(root: str, depth: int, extensions: Sequence[str] = EXTENSIONS) -> list[tuple[str, ...]]:
    """Relative paths (as tuples of parts, sorted) of every image exactly `depth` folders below root.

    Raises DataError naming the file for an image at another depth, and naming the folder for
    a class folder (depth 1..`depth`) with no image below it. Hidden entries are ignored; folders
    that are symbolic links are followed (a collection assembled from links), each real folder once.
    """
    if not os.path.isdir(root):
        raise DataError(f"dataset root {root} does not exist or is not a folder")
    exts = tuple(e.lower() for e in extensions)
    found: list[tuple[str, ...]] = []
    counts: dict[str, int] = {}          # class folder (relative) -> images below it
    real: dict[str, str] = {}            # real path -> the folder that reached it first
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        first = real.setdefault(os.path.realpath(dirpath), dirpath)
        if first != dirpath:              # a link back up the tree, or two links to one folder
            raise DataError(f"folder {dirpath} is the same folder as {first} (symbolic links): each image "
                            f"must have one place in the taxonomy")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        parts = () if rel == "." else tuple(rel.split(os.sep))
        if 1 <= len(parts) <= depth:
            counts.setdefault(os.path.join(*parts), 0)
        for f in sorted(filenames):
            if f.startswith(".") or not f.lower().endswith(exts):
                continue
            if len(parts) != depth:
                raise DataError(f"image {os.path.join(dirpath, f)} is at depth {len(parts)}; "
                                f"expected exactly {depth} folder levels below {root}")
            found.append(parts + (f,))
            for l in range(1, depth + 1):
                counts[os.path.join(*parts[:l])] += 1
    for folder, n in counts.items():
        if n == 0:
            raise DataError(f"class folder {os.path.join(root, folder)} contains no images "
                            f"(extensions {', '.join(exts)})")
    if not found:
        raise DataError(f"no images found under {root} (extensions {', '.join(exts)})")
    return found


def class_names(rel: tuple[str, ...], depth: int) -> list[str]:
    """Class name at every level: the '/'-joined folder prefix."""
    return ["/".join(rel[:l + 1]) for l in range(depth)]


def make_collections(levels: list[str], train: list[str], train_names: list[list[str]],
                     query: list[str], query_names: list[list[str]], *, source: str,
                     channels: int, cache_size: int | None, invert: bool = False,
                     prefix: str = "folders") -> tuple[FileCollection, FileCollection]:
    """Train and query FileCollections over ONE hierarchy built from both sets of names."""
    hierarchy, labels = build_hierarchy(levels, train_names + query_names, source=source)
    n = len(train)
    parts = []
    for name, paths, sl in ((f"{prefix}-train", train, slice(0, n)),
                            (f"{prefix}-query", query, slice(n, None))):
        lab = {k: v[sl] for k, v in labels.items()}
        parts.append(FileCollection(name, hierarchy, lab, paths, channels, cache_size, invert))
    return parts[0], parts[1]


def split_sorted(paths: list[str], leaves: list[str], fraction: float) -> np.ndarray:
    """Boolean mask of held-out samples: per leaf class, files sorted by name, the first
    max(1, floor((1 - fraction) * n)) stay in the collection and the rest are queries."""
    held = np.zeros(len(leaves), dtype=bool)
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(leaves):
        by_class.setdefault(c, []).append(i)
    for idx in by_class.values():
        idx = sorted(idx, key=lambda i: os.path.basename(paths[i]))
        keep = max(1, int(np.floor((1.0 - fraction) * len(idx) + 1e-9)))
        held[idx[keep:]] = True
    return held


def split_fraction(leaves: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out samples: `fraction` of each leaf class, at least one kept for train."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(leaves), dtype=bool)
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(leaves):
        by_class.setdefault(c, []).append(i)
    for c in sorted(by_class):
        idx = np.asarray(by_class[c])
        k = min(int(round(fraction * len(idx))), len(idx) - 1)
        held[rng.permutation(idx)[:k]] = True
    return held


def load_folders(root: str, *, levels: list[str], query_root: str | None = None,
                 query_fraction: float = 0.0, channels: int = 3, cache_size: int | None = None,
                 seed: int = 0, split: str = "random", extensions: Sequence[str] = EXTENSIONS,
                 invert: bool = False) -> tuple[FileCollection, FileCollection]:
    """(train, query) from a taxonomy of nested folders; see the module docstring."""
    levels = list(levels or [])
    if not levels:
        raise ConfigError("data.options.levels: give one name per folder level, coarse -> fine")
    if not 0.0 <= query_fraction < 1.0:
        raise ConfigError(f"data.options.query_fraction: must be in [0, 1), got {query_fraction}")
    if query_root is not None and query_fraction > 0:
        raise ConfigError("data.options: give query_root or query_fraction, not both")
    if root is None:
        raise ConfigError("data.root: required for dataset 'folders'")
    depth = len(levels)
    rels = scan_tree(root, depth, extensions)
    paths = [os.path.join(root, *r) for r in rels]
    names = [class_names(r, depth) for r in rels]
    if query_root is not None:
        qrels = scan_tree(query_root, depth, extensions)
        known = {n[-1] for n in names}
        for r in qrels:
            leaf = class_names(r, depth)[-1]
            if leaf not in known:
                raise DataError(f"query class {leaf!r} ({os.path.join(query_root, *r[:-1])}) "
                                f"has no images in the train root {root}")
        qpaths = [os.path.join(query_root, *r) for r in qrels]
        qnames = [class_names(r, depth) for r in qrels]
    else:
        if split not in ("random", "sorted"):
            raise ConfigError(f"data.options.split: random or sorted, got {split!r}")
        leaves = [n[-1] for n in names]
        held = (split_sorted(paths, leaves, query_fraction) if split == "sorted"
                else split_fraction(leaves, query_fraction, seed))
        qpaths = [p for p, h in zip(paths, held) if h]
        qnames = [n for n, h in zip(names, held) if h]
        paths = [p for p, h in zip(paths, held) if not h]
        names = [n for n, h in zip(names, held) if not h]
    return make_collections(levels, paths, names, qpaths, qnames, source=root,
                            channels=channels, cache_size=cache_size, invert=invert)


def find_omniglot(root: str) -> str | None:
    """The images_background folder under root (or root itself, or torchvision's layout)."""
    candidates = [os.path.join(root, "images_background"),
                  os.path.join(root, "omniglot-py", "images_background")]
    if os.path.basename(os.path.normpath(root)) == "images_background":
        candidates.insert(0, root)
    return next((c for c in candidates if os.path.isdir(c)), None)


def drawer_of(path: str) -> int:
    """Omniglot files are <charid>_<drawer>.png; the drawer is the number after the '_'."""
    stem = os.path.splitext(os.path.basename(path))[0]
    try:
        return int(stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        raise DataError(f"Omniglot file {path} is not named <charid>_<drawer>.png") from None


def load_omniglot(root: str, *, train_drawers: int = 15, cache_size: int | None = 32,
                  invert: bool = True, download: bool = False, alphabets: list[str] | None = None
                  ) -> tuple[FileCollection, FileCollection]:
    """(train, query): drawers 1..train_drawers of every character train, the rest query.

    Levels alphabet -> character; grayscale; `invert` makes ink bright on black so that
    padding and crops add background. `alphabets`: only these (a quick subset; all by default).
    """
    if root is None:
        raise ConfigError("data.root: required for dataset 'omniglot'")
    if train_drawers < 1:
        raise ConfigError(f"data.options.train_drawers: must be >= 1, got {train_drawers}")
    folder = find_omniglot(root)
    if folder is None and download:
        import torchvision  # only needed for the download path
        torchvision.datasets.Omniglot(root, background=True, download=True)
        folder = find_omniglot(root)
    if folder is None:
        raise DataError(f"Omniglot not found at {root}: expected {root}/images_background/"
                        f"<Alphabet>/character<NN>/<charid>_<drawer>.png (or pass download=True)")
    rels = scan_tree(folder, 2, (".png",))
    if alphabets is not None:
        if not isinstance(alphabets, list) or not all(isinstance(a, str) for a in alphabets):
            raise ConfigError(f"data.options.alphabets: expected a list of alphabet names, got {alphabets!r}")
        known = sorted({r[0] for r in rels})
        unknown = [a for a in alphabets if a not in known]
        if unknown or not alphabets:
            raise ConfigError(f"data.options.alphabets: {unknown[0]!r} is not an alphabet of {folder} (e.g. "
                              f"{', '.join(known[:3])})" if unknown else "data.options.alphabets: empty")
        rels = [r for r in rels if r[0] in alphabets]
    train, train_names, query, query_names = [], [], [], []
    for r in rels:
        path = os.path.join(folder, *r)
        to_train = drawer_of(path) <= train_drawers
        (train if to_train else query).append(path)
        (train_names if to_train else query_names).append(class_names(r, 2))
    if not train:
        raise DataError(f"Omniglot at {folder}: no image has a drawer <= {train_drawers}")
    return make_collections(OMNIGLOT_LEVELS, train, train_names, query, query_names,
                            source=folder, channels=1, cache_size=cache_size, invert=invert,
                            prefix="omniglot")
