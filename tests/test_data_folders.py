"""Folder-taxonomy and Omniglot loaders, image collections, synthetic data, transforms."""
from __future__ import annotations

import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image

from grafit_core.data import check_options
from grafit_core.data.folders import load_folders, load_omniglot
from grafit_core.data.images import FileCollection, TensorCollection, split_collection
from grafit_core.data.synthetic import load_synthetic
from grafit_core.data.transforms import PRESETS, GlyphCropAffine, build_transform
from grafit_core.errors import ConfigError, DataError

REAL_OMNIGLOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "omniglot")


def write_image(path, size=(12, 10), value=0, fmt=None, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, format=fmt)
    return str(path)


def make_tree(root, files):
    for i, rel in enumerate(files):
        write_image(os.path.join(root, rel), value=i)
    return str(root)


TWO_LEVEL = ["Greek/character01/a.png", "Greek/character01/b.png", "Greek/character02/c.png",
             "Latin/character01/d.jpg", "Latin/character01/e.jpg", "Latin/character03/f.png"]


# --- folder taxonomy ---------------------------------------------------------------

def test_two_level_tree_labels(tmp_path):
    train, query = load_folders(make_tree(tmp_path / "t", TWO_LEVEL), levels=["alphabet", "character"])
    h = train.hierarchy
    assert h.classes["alphabet"] == ["Greek", "Latin"]
    # Same folder name under two alphabets = two classes.
    assert h.classes["character"] == ["Greek/character01", "Greek/character02",
                                      "Latin/character01", "Latin/character03"]
    assert [os.path.basename(p) for p in train.paths] == ["a.png", "b.png", "c.png",
                                                           "d.jpg", "e.jpg", "f.png"]
    assert train.labels["alphabet"].tolist() == [0, 0, 0, 1, 1, 1]
    assert train.labels["character"].tolist() == [0, 0, 1, 2, 2, 3]
    assert h.parents["character"].tolist() == [0, 0, 1, 1]
    assert len(query) == 0 and query.hierarchy is h
    assert train.image(3).shape == (3, 10, 12) and train.image(3).dtype == torch.uint8


def test_three_level_catalog(tmp_path):
    files = ["shoes/boots/b1.jpg", "shoes/boots/b2.jpg", "shoes/sneakers/s1.jpg",
             "bags/totes/t1.jpg", "bags/backpacks/p1.jpg", "bags/backpacks/p2.jpg"]
    root = make_tree(tmp_path / "cat", [f"shop/{f}" for f in files])
    train, _ = load_folders(root, levels=["store", "category", "subcategory"], cache_size=8)
    h = train.hierarchy
    assert h.classes["store"] == ["shop"]
    assert h.classes["category"] == ["shop/bags", "shop/shoes"]
    assert h.classes["subcategory"] == ["shop/bags/backpacks", "shop/bags/totes",
                                        "shop/shoes/boots", "shop/shoes/sneakers"]
    assert train.labels["store"].tolist() == [0] * 6
    assert train.labels["category"].tolist() == [0, 0, 0, 1, 1, 1]
    assert train.labels["subcategory"].tolist() == [0, 0, 1, 2, 2, 3]
    assert h.ancestor_map("subcategory", "category").tolist() == [0, 0, 1, 1]
    assert train.image(0).shape == (3, 8, 8) and train._cache.shape == (6, 3, 8, 8)


def test_query_root_shares_hierarchy(tmp_path):
    root = make_tree(tmp_path / "train", TWO_LEVEL)
    qroot = make_tree(tmp_path / "query", ["Latin/character03/q1.png", "Greek/character01/q2.png"])
    train, query = load_folders(root, levels=["alphabet", "character"], query_root=qroot)
    assert query.hierarchy is train.hierarchy and len(train) == 6
    assert query.labels["character"].tolist() == [0, 3]
    assert query.labels["alphabet"].tolist() == [0, 1]


def test_query_fraction_per_leaf_and_seeded(tmp_path):
    files = [f"A/c{c}/{i}.png" for c in range(3) for i in range(10)]
    root = make_tree(tmp_path / "t", files)
    train, query = load_folders(root, levels=["a", "c"], query_fraction=0.3, seed=1)
    assert len(train) == 21 and len(query) == 9
    assert np.bincount(query.labels["c"]).tolist() == [3, 3, 3]
    assert not set(train.paths) & set(query.paths)
    again = load_folders(root, levels=["a", "c"], query_fraction=0.3, seed=1)[1]
    other = load_folders(root, levels=["a", "c"], query_fraction=0.3, seed=2)[1]
    assert again.paths == query.paths and other.paths != query.paths
    with pytest.raises(ConfigError, match="query_fraction"):
        load_folders(root, levels=["a", "c"], query_fraction=1.0)


def test_class_folders_that_are_links_are_followed_and_a_loop_is_refused(tmp_path):
    root = make_tree(tmp_path / "catalog", TWO_LEVEL[:3])
    elsewhere = make_tree(tmp_path / "elsewhere", ["character01/d.jpg", "character03/f.png"])
    os.symlink(elsewhere, os.path.join(root, "Latin"))          # a collection assembled from links
    train, _ = load_folders(root, levels=["alphabet", "character"])
    assert train.hierarchy.classes["alphabet"] == ["Greek", "Latin"] and len(train) == 5
    os.symlink(root, os.path.join(root, "Greek", "character01", "back"))
    with pytest.raises(DataError, match="is the same folder as .*catalog \\(symbolic links\\)"):
        load_folders(root, levels=["alphabet", "character"])


def test_folder_errors_name_the_culprit(tmp_path):
    with pytest.raises(DataError, match="nope"):
        load_folders(str(tmp_path / "nope"), levels=["a", "b"])
    root = make_tree(tmp_path / "empty", TWO_LEVEL)
    os.makedirs(os.path.join(root, "Latin", "character09"))
    with pytest.raises(DataError, match="character09"):
        load_folders(root, levels=["alphabet", "character"])
    os.makedirs(os.path.join(root, "Runic"))   # empty at the coarse level too
    os.rmdir(os.path.join(root, "Latin", "character09"))
    with pytest.raises(DataError, match="Runic"):
        load_folders(root, levels=["alphabet", "character"])
    root = make_tree(tmp_path / "depth", TWO_LEVEL + ["Greek/stray.png"])
    with pytest.raises(DataError, match="stray.png"):
        load_folders(root, levels=["alphabet", "character"])
    qroot = make_tree(tmp_path / "q", ["Greek/character07/q.png"])
    with pytest.raises(DataError, match="Greek/character07"):
        load_folders(make_tree(tmp_path / "ok", TWO_LEVEL), levels=["alphabet", "character"],
                     query_root=qroot)


def test_registry_options_fit_signatures():
    check_options("folders", {"levels": ["a"], "query_fraction": 0.2, "cache_size": 32})
    check_options("omniglot", {"train_drawers": 10})
    with pytest.raises(ConfigError, match="levels"):
        check_options("folders", {})


# --- image checks and collections ----------------------------------------------------

def test_check_images_raise_and_skip(tmp_path):
    root = make_tree(tmp_path / "t", TWO_LEVEL + ["Latin/character03/g.jpg"])
    train, _ = load_folders(root, levels=["alphabet", "character"])
    assert train.check_images() is train
    bad = {1: "b.png", 4: "e.jpg", 6: "g.jpg"}   # truncated PNG, truncated JPEG, zero bytes
    for i, name in bad.items():
        data = open(train.paths[i], "rb").read()
        open(train.paths[i], "wb").write(data[: len(data) // 2] if i != 6 else b"")
    with pytest.raises(DataError, match="b.png"):
        train.check_images("raise")
    kept = train.check_images("skip")
    assert sorted(os.path.basename(p) for p in kept.skipped) == sorted(bad.values())
    assert [os.path.basename(p) for p in kept.paths] == ["a.png", "c.png", "d.jpg", "f.png"]
    assert kept.labels["character"].tolist() == [0, 1, 2, 3]
    assert kept.labels["alphabet"].tolist() == [0, 0, 1, 1]
    assert kept.hierarchy is train.hierarchy and len(train) == 7
    for i, name in [(1, "b.png"), (6, "g.jpg")]:
        with pytest.raises(DataError, match=name):
            FileCollection("one", train.hierarchy, {k: v[[i]] for k, v in train.labels.items()},
                           [train.paths[i]], 3, None).check_images()


def test_file_collection_pickles_and_splits(tmp_path):
    root = make_tree(tmp_path / "t", TWO_LEVEL)
    train, _ = load_folders(root, levels=["alphabet", "character"], channels=1, cache_size=6)
    first = train.image(2)
    assert first.shape == (1, 6, 6)
    clone = pickle.loads(pickle.dumps(train))
    assert clone.paths == train.paths and torch.equal(clone.image(2), first)
    assert clone.labels["character"].tolist() == train.labels["character"].tolist()
    sub = split_collection(train, [5, 2], "sub")
    assert sub.labels["character"].tolist() == [3, 1] and torch.equal(sub.image(1), first)
    streamed = FileCollection("s", train.hierarchy, train.labels, train.paths, 1, None)
    assert streamed.image(0).shape == (1, 10, 12)
    assert pickle.loads(pickle.dumps(streamed)).image(0).shape == (1, 10, 12)
    imgs = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, 3, 2, 2)
    labs = {"a": np.array([0, 0, 1, 1])}
    t = split_collection(TensorCollection("t", train.hierarchy, labs, imgs), [3, 0], "t2")
    assert isinstance(t, TensorCollection) and torch.equal(t.image(0), imgs[3])


# --- Omniglot ------------------------------------------------------------------------

def fake_omniglot(root, drawers=20):
    for alpha, chars in [("Greek", 2), ("Latin", 1)]:
        for c in range(1, chars + 1):
            for d in range(1, drawers + 1):
                path = os.path.join(root, "images_background", alpha, f"character{c:02d}",
                                    f"{alpha[0]}{c:03d}_{d:02d}.png")
                write_image(path, (20, 20), value=d, mode="L")
    return str(root)


def test_fake_omniglot_drawer_split(tmp_path):
    root = fake_omniglot(tmp_path / "omni")
    for r in (root, os.path.join(root, "images_background")):
        train, query = load_omniglot(r, cache_size=8)
        assert len(train) == 3 * 15 and len(query) == 3 * 5
        drawers = lambda c: sorted({int(p[-6:-4]) for p in c.paths})
        assert drawers(train) == list(range(1, 16)) and drawers(query) == list(range(16, 21))
        assert query.hierarchy is train.hierarchy and train.hierarchy.levels == ["alphabet", "character"]
        assert np.bincount(train.labels["character"]).tolist() == [15, 15, 15]
        assert train.image(0).shape == (1, 8, 8)
    raw = load_omniglot(root, cache_size=None, invert=False)[0]
    inv = load_omniglot(root, cache_size=None, invert=True)[0]
    assert torch.equal(inv.image(0), 255 - raw.image(0))
    assert len(load_omniglot(root, train_drawers=5)[0]) == 15
    with pytest.raises(DataError, match="missing_here"):
        load_omniglot(str(tmp_path / "missing_here"))


@pytest.mark.skipif(not os.path.isdir(REAL_OMNIGLOT), reason="shared Omniglot not present")
def test_real_omniglot_counts():
    t0 = time.time()
    train, query = load_omniglot(REAL_OMNIGLOT, cache_size=None)
    assert time.time() - t0 < 15
    assert len(train) == 14460 and len(query) == 4820
    h = train.hierarchy
    assert h.num_classes("alphabet") == 30 and h.num_classes("character") == 964
    assert np.bincount(train.labels["character"], minlength=964).tolist() == [15] * 964
    assert np.bincount(query.labels["character"], minlength=964).tolist() == [5] * 964
    img = train.image(0)
    assert img.shape == (1, 105, 105) and img.float().mean() < 60   # inverted: mostly black


# --- synthetic -----------------------------------------------------------------------

def test_synthetic_shape_and_determinism():
    t0 = time.time()
    train, query = load_synthetic(branching=[2, 3], per_class=5, queries_per_class=2, seed=3)
    assert time.time() - t0 < 0.5
    h = train.hierarchy
    assert h.levels == ["l0", "l1"] and h.classes["l0"] == ["a1", "a2"]
    assert h.classes["l1"] == ["a1.b1", "a1.b2", "a1.b3", "a2.b1", "a2.b2", "a2.b3"]
    assert h.parents["l1"].tolist() == [0, 0, 0, 1, 1, 1]
    assert len(train) == 30 and len(query) == 12 and query.hierarchy is h
    assert train.image(0).shape == (3, 16, 16) and train.image(0).dtype == torch.uint8
    again = load_synthetic(branching=[2, 3], per_class=5, queries_per_class=2, seed=3)[0]
    assert torch.equal(again.images, train.images)
    assert not torch.equal(load_synthetic(branching=[2, 3], per_class=5, seed=4)[0].images,
                           train.images)
    # Fine classes are separable: nearest class mean on the queries is right.
    x, q = train.images.flatten(1).float(), query.images.flatten(1).float()
    y = torch.as_tensor(train.labels["l1"])
    means = torch.stack([x[y == c].mean(0) for c in range(6)])
    pred = torch.cdist(q, means).argmin(1).numpy()
    assert (pred == query.labels["l1"]).mean() > 0.9


# --- transforms ----------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("train", [True, False])
def test_transform_shapes_and_seed(preset, train):
    channels = 1 if preset == "characters" else 3
    x = torch.randint(0, 256, (channels, 40, 36), dtype=torch.uint8)
    t = build_transform(preset, 24, channels, train)
    torch.manual_seed(0)
    a = t(x)
    torch.manual_seed(0)
    b = t(x)
    assert a.shape == (channels, 24, 24) and a.dtype == torch.float32 and torch.equal(a, b)


def test_unknown_preset_names_key():
    with pytest.raises(ConfigError, match="data.augment.*characters"):
        build_transform("sketchy", 32, 1, True)


def test_characters_never_flip():
    t = build_transform("characters", 32, 1, train=True)
    names = [type(op).__name__ for op in t.transforms]
    assert not any("Flip" in n for n in names)
    glyph = torch.zeros(1, 32, 32, dtype=torch.uint8)
    glyph[0, 4:28, 0:12] = 255            # ink only on the left: a flip would move it right
    torch.manual_seed(0)
    for _ in range(200):
        out = t(glyph)[0]
        assert out[:, :16].sum() > out[:, 16:].sum() + 50


def test_glyph_augment_identity_when_no_randomness():
    g = GlyphCropAffine(32, [0.0], [1.0], scale=(1, 1), ratio=(1, 1), degrees=0, shear=0)
    x = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8)
    assert torch.allclose(g(x) * 255, x.float(), atol=1e-3)
