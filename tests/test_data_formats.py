"""The CIFAR-100, iNaturalist and ImageNet loaders on tiny datasets written in the real formats.

Expected class ids are literals worked out by hand: a class's id is its position among the
sorted class names of its level (see build_hierarchy).
"""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from grafit_core.data import check_options, load_dataset
from grafit_core.data.cifar import load_cifar100
from grafit_core.data.imagenet import load_imagenet
from grafit_core.data.inaturalist import RANKS, load_inaturalist
from grafit_core.errors import ConfigError, DataError


def _jpeg(path, color, size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG", quality=95)


# ====== CIFAR-100 ======
FINE = ["aquarium_fish", "beaver", "dolphin", "flatfish", "orchid", "poppy"]  # alphabetical, like meta
COARSE = ["aquatic_mammals", "fish", "flowers"]
PARENT = [1, 0, 0, 1, 2, 2]  # coarse id of each fine id


def _write_cifar(root, train_fine=None, test_fine=None, train_coarse=None):
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)

    def split(name, fine, coarse):
        data = rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8)
        d = {b"filenames": [f"img_{i}.png".encode() for i in range(len(fine))],
             b"batch_label": f"{name} batch".encode(), b"fine_labels": list(fine),
             b"coarse_labels": list(coarse), b"data": data}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(d, f, protocol=2)  # Python-2-era protocol, bytes keys: like the real files
        return data

    train_fine = train_fine or [0, 1, 2, 3, 4, 5] * 4      # 3 superclasses x 2 classes x 4 images
    test_fine = test_fine or [5, 4, 3, 2, 1, 0] * 2
    train_coarse = train_coarse or [PARENT[f] for f in train_fine]
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in FINE],
                     b"coarse_label_names": [n.encode() for n in COARSE]}, f, protocol=2)
    train = split("train", train_fine, train_coarse)
    test = split("test", test_fine, [PARENT[f] for f in test_fine])
    return folder, train, test


def test_cifar100_levels_labels_pixels(tmp_path):
    folder, train_rows, test_rows = _write_cifar(str(tmp_path))
    train, query = load_cifar100(str(tmp_path))
    h = train.hierarchy
    assert query.hierarchy is h
    assert h.level_names() == ["none", "superclass", "class"]
    assert h.classes["superclass"] == COARSE and h.classes["class"] == FINE
    assert (len(train), len(query)) == (24, 12)
    assert train.labels_at("class").tolist() == [0, 1, 2, 3, 4, 5] * 4
    assert train.labels_at("superclass").tolist() == [1, 0, 0, 1, 2, 2] * 4
    assert query.labels_at("class").tolist() == [5, 4, 3, 2, 1, 0] * 2
    assert query.labels_at("superclass").tolist() == [2, 2, 1, 0, 0, 1] * 2
    assert h.ancestor_map("class", "superclass").tolist() == [1, 0, 0, 1, 2, 2]
    for coll, rows in ((train, train_rows), (query, test_rows)):
        for i in (0, 7, len(coll) - 1):
            img = coll.image(i)
            assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
            assert torch.equal(img, torch.from_numpy(rows[i].reshape(3, 32, 32)))
    # Row-major RGB planes: byte 1024 is green at (0, 0), byte 2048 + 32 blue at (1, 0).
    assert int(train.image(3)[1, 0, 0]) == int(train_rows[3][1024])
    assert int(train.image(3)[2, 1, 0]) == int(train_rows[3][2048 + 32])
    # root may also be the cifar-100-python folder itself, and the registry finds the loader.
    assert len(load_cifar100(folder)[0]) == 24
    assert len(load_dataset("cifar100", str(tmp_path), {})[1]) == 12


def test_cifar100_errors(tmp_path):
    # The last poppy of the train split is filed under aquatic_mammals (0) instead of flowers (2).
    coarse = [1, 0, 0, 1, 2, 2] * 3 + [1, 0, 0, 1, 2, 0]
    folder, _, _ = _write_cifar(str(tmp_path / "twoparents"), train_coarse=coarse)
    with pytest.raises(DataError, match="'poppy'.*two parents"):
        load_cifar100(folder)
    folder, _, _ = _write_cifar(str(tmp_path / "testonly"), train_fine=[0, 1, 2, 3, 4] * 4)
    with pytest.raises(DataError, match="'poppy'.*no training image"):
        load_cifar100(folder)
    for name in ("test", "train", "meta"):  # removed one by one, the one read first last
        os.remove(os.path.join(folder, name))
        with pytest.raises(DataError, match=f"missing file .*{name}$"):
            load_cifar100(folder)
    with pytest.raises(DataError, match="cache_size"):
        load_cifar100(str(tmp_path / "twoparents"), cache_size=64)


def test_cifar100_malformed_files(tmp_path):
    folder, _, _ = _write_cifar(str(tmp_path))
    path = os.path.join(folder, "train")
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    d[b"fine_labels"][2] = 100
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)
    with pytest.raises(DataError, match="train: fine_labels contains 100"):
        load_cifar100(folder)
    d[b"fine_labels"][2] = 2
    d[b"data"] = d[b"data"][:, :1024]
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)
    with pytest.raises(DataError, match="train: b'data' must be N x 3072"):
        load_cifar100(folder)
    with open(path, "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(DataError, match="cannot read .*train"):
        load_cifar100(folder)
    marker = tmp_path / "executed"

    class Payload:                       # what a malicious file does: call a function on load
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    with open(path, "wb") as f:
        pickle.dump({b"data": Payload()}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load posix.mkdir"):
        load_cifar100(folder)
    assert not marker.exists()


# ====== iNaturalist ======
TAXA = [  # id, species (name), kingdom, phylum, class, order, family, genus
    (0, "Quercus alba", "Plantae", "Tracheophyta", "Magnoliopsida", "Fagales", "Fagaceae", "Quercus"),
    (1, "Quercus rubra", "Plantae", "Tracheophyta", "Magnoliopsida", "Fagales", "Fagaceae", "Quercus"),
    (2, "Betula nigra", "Plantae", "Tracheophyta", "Magnoliopsida", "Fagales", "Betulaceae", "Betula"),
    (3, "Bombus terrestris", "Animalia", "Arthropoda", "Insecta", "Hymenoptera", "Apidae", "Bombus"),
    (4, "Apis mellifera", "Animalia", "Arthropoda", "Insecta", "Hymenoptera", "Apidae", "Apis"),
    (5, "Acer rubrum", "Plantae", "Tracheophyta", "Magnoliopsida", "Sapindales", "Sapindaceae", "Acer"),
]  # Acer rubrum has no image: it must not become a class
TRAIN_CATS = [0, 1, 2, 3, 4, 0, 3]
VAL_CATS = [1, 3, 4]


def _categories(version, taxa=TAXA):
    cats = []
    for t in taxa:
        cat = {"id": t[0], "name": t[1], **dict(zip(RANKS[:6], t[2:]))}
        if version == "2018":
            cat["supercategory"] = "Plantae" if t[2] == "Plantae" else "Insecta"
        cats.append(cat)
    return cats


def _write_inat(root, version="2018", train_cats=TRAIN_CATS, val_cats=VAL_CATS, taxa=TAXA, edit=None):
    for split, cats in (("train", train_cats), ("val", val_cats)):
        images, annotations = [], []
        for k, cat in enumerate(cats):
            image_id = (100 if split == "train" else 200) + k
            name = f"train_val{version}/{taxa[cat][2]}/{cat}/{split}_{k}.jpg"
            _jpeg(os.path.join(root, name), (40 * cat, 10 * k, 200))
            images.append({"id": image_id, "file_name": name, "width": 8, "height": 8, "license": 1})
            annotations.append({"id": k, "image_id": image_id, "category_id": cat})
        data = {"info": {"year": int(version)}, "images": images, "annotations": annotations,
                "categories": _categories(version, taxa), "licenses": []}
        if edit and split == "train":
            edit(data)
        with open(os.path.join(root, f"{split}{version}.json"), "w") as f:
            json.dump(data, f)


def test_inaturalist_all_ranks(tmp_path):
    _write_inat(str(tmp_path))
    train, query = load_inaturalist(str(tmp_path))
    h = train.hierarchy
    assert h.levels == RANKS and query.hierarchy is h
    assert h.classes["kingdom"] == ["Animalia", "Plantae"]
    assert h.classes["order"] == ["Fagales", "Hymenoptera"]
    assert h.classes["family"] == ["Apidae", "Betulaceae", "Fagaceae"]
    assert h.classes["genus"] == ["Apis", "Betula", "Bombus", "Quercus"]
    assert h.classes["species"] == ["Apis mellifera", "Betula nigra", "Bombus terrestris",
                                    "Quercus alba", "Quercus rubra"]
    assert (len(train), len(query)) == (7, 3)
    assert train.labels_at("species").tolist() == [3, 4, 1, 2, 0, 3, 2]
    assert train.labels_at("genus").tolist() == [3, 3, 1, 2, 0, 3, 2]
    assert train.labels_at("kingdom").tolist() == [1, 1, 1, 0, 0, 1, 0]
    assert query.labels_at("species").tolist() == [4, 2, 0]
    assert h.ancestor_map("species", "genus").tolist() == [0, 1, 2, 3, 3]
    assert h.ancestor_map("genus", "family").tolist() == [0, 1, 0, 2]
    assert h.ancestor_map("species", "kingdom").tolist() == [0, 1, 0, 1, 1]
    img = train.image(2)  # category 2, k=2: colour (80, 20, 200)
    assert img.dtype == torch.uint8 and img.shape == (3, 8, 8)
    assert torch.allclose(img.float().mean((1, 2)), torch.tensor([80.0, 20.0, 200.0]), atol=6)
    assert train.paths[0] == os.path.join(str(tmp_path), "train_val2018/Plantae/0/train_0.jpg")
    cached, _ = load_inaturalist(str(tmp_path), cache_size=4)
    assert cached.image(2).shape == (3, 4, 4)


def test_inaturalist_2019_subset_of_ranks(tmp_path):
    _write_inat(str(tmp_path), version="2019")  # no "supercategory" key
    train, query = load_dataset("inaturalist", str(tmp_path),
                                {"version": "2019", "levels": ["family", "species"]})
    h = train.hierarchy
    assert h.level_names() == ["none", "family", "species"]
    assert h.classes["family"] == ["Apidae", "Betulaceae", "Fagaceae"]
    assert train.labels_at("family").tolist() == [2, 2, 1, 0, 0, 2, 0]
    assert query.labels_at("family").tolist() == [2, 0, 0]
    assert h.ancestor_map("species", "family").tolist() == [0, 1, 0, 2, 2]


def test_inaturalist_errors(tmp_path):
    root = str(tmp_path / "ok")
    _write_inat(root)
    with pytest.raises(DataError, match="unknown rank 'tribe'"):
        load_inaturalist(root, levels=["family", "tribe"])
    with pytest.raises(DataError, match="coarse -> fine"):
        load_inaturalist(root, levels=["species", "genus"])
    with pytest.raises(DataError, match="missing annotation file .*train2019.json"):
        load_inaturalist(root, version="2019")
    os.rename(os.path.join(root, "val2018.json"), os.path.join(root, "val.json"))
    with pytest.raises(DataError, match="missing annotation file .*val2018.json"):
        load_inaturalist(root)

    def drop_annotation(data):
        data["annotations"].pop(3)  # image 103
    root = str(tmp_path / "unannotated")
    _write_inat(root, edit=drop_annotation)
    with pytest.raises(DataError,
                       match=r"train2018.json: image 103 \(.*train_3.jpg\) has no annotation"):
        load_inaturalist(root)

    def unknown_category(data):
        data["annotations"][1]["category_id"] = 77
    root = str(tmp_path / "unknown")
    _write_inat(root, edit=unknown_category)
    with pytest.raises(DataError, match="image 101 has category_id 77"):
        load_inaturalist(root)

    def no_genus(data):
        del data["categories"][2]["genus"]
    root = str(tmp_path / "nogenus")
    _write_inat(root, edit=no_genus)
    with pytest.raises(DataError, match="category 2 has no 'genus' key"):
        load_inaturalist(root)
    assert len(load_inaturalist(root, levels=["family", "species"])[0]) == 7  # genus not needed

    # Quercus filed under Betulaceae by one more species: the genus has two parents.
    taxa = TAXA + [(6, "Quercus nova", "Plantae", "Tracheophyta", "Magnoliopsida", "Fagales",
                    "Betulaceae", "Quercus")]
    root = str(tmp_path / "twoparents")
    _write_inat(root, train_cats=TRAIN_CATS + [6], taxa=taxa)
    with pytest.raises(DataError, match="'Quercus' at level 'genus' is under two parents"):
        load_inaturalist(root)

    root = str(tmp_path / "valonly")
    _write_inat(root, val_cats=[1, 5])
    with pytest.raises(DataError, match="species 'Acer rubrum' has validation images but no training"):
        load_inaturalist(root)


# ====== ImageNet ======
WNIDS = {"n01440764": ("fish", 2), "n01443537": ("fish", 2), "n01530575": ("bird", 3),
         "n02085620": ("toy dog", 2), "n02085782": ("toy dog", 2)}  # wnid -> (coarse, train images)
MAPPING = ("# coarse classes for the test\n"
           "n01440764\tfish\n\nn01443537\tfish\n  # indented comment\n"
           "n01530575\tbird\nn02085620\ttoy dog\nn02085782\ttoy dog\n"
           "n09999999\tfish\n"  # no folder: ignored, fish still has classes
           "n01440764\tfish\n")  # repeated with the same coarse class: fine


def _write_imagenet(root, mapping=MAPPING, wnids=WNIDS):
    for wnid, (_, count) in wnids.items():
        for split, n in (("train", count), ("val", 1)):
            for k in range(n):
                _jpeg(os.path.join(root, split, wnid, f"{wnid}_{split}_{k}.JPEG"), (20 * k, 60, 120))
    path = os.path.join(root, "coarse.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(mapping)
    return path


def test_imagenet_folders_and_mapping(tmp_path):
    mapping = _write_imagenet(str(tmp_path))
    train, query = load_imagenet(str(tmp_path), mapping=mapping,
                                 coarse_level="basic", fine_level="synset")
    h = train.hierarchy
    assert h.level_names() == ["none", "basic", "synset"] and query.hierarchy is h
    assert h.classes["basic"] == ["bird", "fish", "toy dog"]
    assert h.classes["synset"] == sorted(WNIDS)
    assert (len(train), len(query)) == (11, 5)
    assert train.labels_at("synset").tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert train.labels_at("basic").tolist() == [1, 1, 1, 1, 0, 0, 0, 2, 2, 2, 2]
    assert query.labels_at("synset").tolist() == [0, 1, 2, 3, 4]
    assert query.labels_at("basic").tolist() == [1, 1, 0, 2, 2]
    assert h.ancestor_map("synset", "basic").tolist() == [1, 1, 0, 2, 2]
    assert train.paths[5].endswith(os.path.join("train", "n01530575", "n01530575_train_1.JPEG"))
    assert train.image(5).shape == (3, 8, 8)
    assert len(load_dataset("imagenet", str(tmp_path), {"mapping": mapping})[0]) == 11
    with pytest.raises(ConfigError, match="data.options.mapping: required"):
        check_options("imagenet", {})


def _imagenet_error(tmp_path, name, mapping=MAPPING, wnids=WNIDS):
    root = str(tmp_path / name)
    path = _write_imagenet(root, mapping, wnids)
    return root, path


def test_imagenet_errors(tmp_path):
    root, path = _imagenet_error(tmp_path, "unmapped", MAPPING.replace("n02085782\ttoy dog\n", ""))
    with pytest.raises(DataError, match="n02085782 is not in the mapping file"):
        load_imagenet(root, mapping=path)

    bad = MAPPING.replace("n01443537\tfish", "n01443537 fish")  # a space, not a tab, on line 4
    root, path = _imagenet_error(tmp_path, "malformed", bad)
    with pytest.raises(DataError, match=r"coarse.txt:4: expected"):
        load_imagenet(root, mapping=path)

    root, path = _imagenet_error(tmp_path, "twice", MAPPING + "n01530575\tfish\n")
    with pytest.raises(DataError,
                       match=r"coarse.txt:11: wnid 'n01530575' is mapped to two coarse classes"):
        load_imagenet(root, mapping=path)

    root, path = _imagenet_error(tmp_path, "emptycoarse", MAPPING + "n04000000\tvehicle\n")
    with pytest.raises(DataError, match="coarse class 'vehicle' .* has no fine class"):
        load_imagenet(root, mapping=path)

    root, path = _imagenet_error(tmp_path, "emptyfolder")
    os.makedirs(os.path.join(root, "train", "n01440764_extra"))
    with open(path, "a", encoding="utf-8") as f:
        f.write("n01440764_extra\tfish\n")
    with pytest.raises(DataError, match="n01440764_extra has no image"):
        load_imagenet(root, mapping=path)

    root, path = _imagenet_error(tmp_path, "valonly")
    _jpeg(os.path.join(root, "val", "n09999999", "x.JPEG"), (0, 0, 0))
    with pytest.raises(DataError, match="'n09999999' has a val folder but no train folder"):
        load_imagenet(root, mapping=path)

    with pytest.raises(DataError, match="missing mapping file .*nope.txt"):
        load_imagenet(root, mapping=os.path.join(root, "nope.txt"))


def test_inaturalist_genus_homonyms_across_kingdoms_are_two_classes(tmp_path):
    # Morus is a mulberry (Plantae, Moraceae) and a gannet (Animalia, Sulidae): not a data error.
    taxa = TAXA + [(6, "Morus alba", "Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Moraceae", "Morus"),
                   (7, "Morus bassanus", "Animalia", "Chordata", "Aves", "Suliformes", "Sulidae", "Morus")]
    root = str(tmp_path / "homonyms")
    _write_inat(root, train_cats=TRAIN_CATS + [6, 7], taxa=taxa)
    train, _ = load_inaturalist(root)
    genera = train.hierarchy.classes["genus"]
    assert "Morus (Plantae)" in genera and "Morus (Animalia)" in genera and "Quercus" in genera
    fam = train.hierarchy.ancestor_map("genus", "family")
    families = train.hierarchy.classes["family"]
    assert families[fam[genera.index("Morus (Plantae)")]] == "Moraceae"
    assert families[fam[genera.index("Morus (Animalia)")]] == "Sulidae"
