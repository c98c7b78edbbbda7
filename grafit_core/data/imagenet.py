"""ImageNet (ILSVRC-2012) in class folders, with a coarse level read from a mapping file.

Layout: `root/train/<wnid>/*.JPEG` and `root/val/<wnid>/*.JPEG` (the validation images
sorted into class folders, as torchvision's ImageFolder expects). Levels are
[coarse_level, fine_level]; the fine classes are the wnids. Train = train/, query = val/.

The mapping file (`mapping=`) assigns every fine class a coarse class. Format: UTF-8 text,
one line per fine class, `<wnid><TAB><coarse class name>`, e.g.

    # Huh et al. (2016), 127 coarse classes
    n01440764	fish
    n01443537	fish

Lines that are blank or start with `#` are ignored; the coarse name may contain spaces
but no tab. A wnid may be listed again only with the same coarse class. Wnids listed but
without a train folder are ignored, yet every coarse class must keep at least one fine
class present. The paper uses the 127 coarse classes of Huh et al. (2016, "What makes
ImageNet good for transfer learning?"); that file is not shipped here: write it in this
format from their release and pass its path.
"""
from __future__ import annotations

import os

from grafit_core.data.hierarchy import build_hierarchy
from grafit_core.data.images import FileCollection
from grafit_core.errors import DataError

EXTENSIONS = (".jpeg", ".jpg", ".png")


def read_mapping(path: str) -> dict[str, str]:
    """-> {wnid: coarse class name}; DataError naming file:line on a malformed line."""
    if not os.path.isfile(path):
        raise DataError(f"ImageNet: missing mapping file {path}")
    mapping: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise DataError(f"{path}:{number}: expected '<wnid><TAB><coarse class>', got {line!r}")
            wnid, coarse = parts[0].strip(), parts[1].strip()
            if mapping.setdefault(wnid, coarse) != coarse:
                raise DataError(f"{path}:{number}: wnid {wnid!r} is mapped to two coarse classes: "
                                f"{mapping[wnid]!r} and {coarse!r}")
    if not mapping:
        raise DataError(f"ImageNet: mapping file {path} lists no class")
    return mapping


def _scan_split(folder: str, mapping: dict[str, str], mapping_path: str):
    """-> (image paths, rows of (coarse, wnid)) for every image under folder/<wnid>/."""
    if not os.path.isdir(folder):
        raise DataError(f"ImageNet: missing folder {folder}")
    paths, rows = [], []
    for wnid in sorted(e.name for e in os.scandir(folder) if e.is_dir()):
        if wnid not in mapping:
            raise DataError(f"ImageNet: class folder {os.path.join(folder, wnid)} is not in "
                            f"the mapping file {mapping_path}")
        class_dir = os.path.join(folder, wnid)
        files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(EXTENSIONS))
        if not files:
            raise DataError(f"ImageNet: class folder {class_dir} has no image")
        paths += [os.path.join(class_dir, f) for f in files]
        rows += [(mapping[wnid], wnid)] * len(files)
    if not paths:
        raise DataError(f"ImageNet: no class folder in {folder}")
    return paths, rows


def load_imagenet(root: str, *, mapping: str, coarse_level: str = "coarse",
                  fine_level: str = "class", cache_size: int | None = None):
    """-> (train, query) FileCollections of RGB images, levels [coarse_level, fine_level]."""
    levels = [coarse_level, fine_level]
    coarse_of = read_mapping(mapping)
    train_paths, train_rows = _scan_split(os.path.join(root, "train"), coarse_of, mapping)
    query_paths, query_rows = _scan_split(os.path.join(root, "val"), coarse_of, mapping)

    # A coarse class whose fine classes are all absent would be an empty class: most likely
    # a mapping written for another ImageNet subset, so refuse instead of guessing.
    present = {wnid for _, wnid in train_rows}
    empty = sorted(set(coarse_of.values()) - {coarse_of[w] for w in present})
    if empty:
        raise DataError(f"ImageNet: coarse class {empty[0]!r} of {mapping} has no fine class "
                        f"with a folder in {os.path.join(root, 'train')}")
    missing = sorted({wnid for _, wnid in query_rows} - present)
    if missing:
        raise DataError(f"ImageNet: class {missing[0]!r} has a val folder but no train folder")

    hierarchy, labels = build_hierarchy(levels, train_rows + query_rows, source=f"ImageNet {root}")
    n = len(train_rows)
    train = FileCollection("imagenet/train", hierarchy, {lv: labels[lv][:n] for lv in levels},
                           train_paths, 3, cache_size)
    query = FileCollection("imagenet/query", hierarchy, {lv: labels[lv][n:] for lv in levels},
                           query_paths, 3, cache_size)
    return train, query
