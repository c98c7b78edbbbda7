"""Data at 10^8 images: the compact path index of file collections and the sampled image check."""
from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
from PIL import Image

import grafit_core.data.images as images
from grafit_core.config import config_from_dict, config_fingerprint, flat_config, load_config, to_dict
from grafit_core.data import prepare_data
from grafit_core.data.folders import load_folders
from grafit_core.data.images import PathIndex, split_collection
from grafit_core.errors import ConfigError, DataError

VARIED = [
    ["/data/train/cats/1.png", "/data/train/cats/2.png", "/data/train/dogs/deep/er/3.jpg", "/data/train/x.png"],
    ["/data/Ελληνικά/α.png", "/data/Ελληνικά/β.png", "/data/日本/猫.jpg", "/data/plain.png"],
    ["/only/one/path.png"],
    ["/a.png", "/b/c.png", "/usr/d/e/f.png"],              # nothing in common but '/'
    ["rel/a.png", "other/b.png", "c.png"],                  # relative, nothing in common
    ["/d/catalog/a.png", "/d/cat/b.png", "/d/cat/b.png"],   # a common string prefix that is no folder; a repeat
    ["/d/\udcff-undecodable.png", "/d/ok.png", ""],         # a surrogate-escaped name, an empty string
    [],
]


@pytest.mark.parametrize("paths", VARIED)
def test_path_index_round_trips(paths):
    idx = PathIndex(paths)
    assert len(idx) == len(paths) and list(idx) == paths
    assert [idx[i] for i in range(len(paths))] == paths
    assert [idx[-i] for i in range(1, len(paths) + 1)] == paths[::-1]
    assert all(type(p) is str for p in idx)
    for bad in (len(paths), -len(paths) - 1):
        with pytest.raises(IndexError):
            idx[bad]
    assert idx.prefix.endswith("/") or idx.prefix == ""
    assert all(p.startswith(idx.prefix) for p in paths)
    clone = pickle.loads(pickle.dumps(idx))
    assert list(clone) == paths and clone == idx


def test_path_index_prefix_is_whole_folders():
    assert PathIndex(VARIED[0]).prefix == "/data/train/"
    assert PathIndex(VARIED[2]).prefix == "/only/one/"
    assert PathIndex(VARIED[3]).prefix == "/"
    assert PathIndex(VARIED[4]).prefix == ""
    assert PathIndex(VARIED[5]).prefix == "/d/"          # not "/d/cat"


def test_path_index_subset_equals_the_list_comprehension(monkeypatch):
    rng = np.random.default_rng(1)
    paths = [f"/data/set/c{rng.integers(100)}/{'ü' * int(rng.integers(0, 4))}{i}.jpg" for i in range(50)]
    idx = PathIndex(paths)
    monkeypatch.setattr(images, "_CHUNK", 7)      # several chunks in take() and in iteration
    for sel in (rng.integers(0, 50, 40), np.arange(50)[::-1], np.array([3, 3, 3]), np.array([], dtype=np.int64),
                [-1, 0, -50, 49]):
        sub = idx.take(sel)
        assert list(sub) == [paths[i] for i in sel]
        assert [sub[i] for i in range(len(sub))] == [paths[i] for i in sel]
    assert list(idx[10:20:3]) == paths[10:20:3]
    assert list(idx) == paths
    with pytest.raises(IndexError):
        idx.take([50])
    # a subset keeps the parent's prefix and still compares equal to an index built from its strings
    sel = [4, 8, 15]
    assert idx.take(sel) == PathIndex([paths[i] for i in sel]) and idx.take(sel) != PathIndex(paths[:3])


def test_path_index_nbytes_is_far_below_python_strings():
    rng = np.random.default_rng(0)      # iNaturalist-like: root / kingdom / class id / 32-hex name
    paths = [f"/mnt/datasets/inaturalist/train_val2018/{['Plantae', 'Insecta', 'Aves'][rng.integers(3)]}/"
             f"{rng.integers(8142)}/{rng.bytes(16).hex()}.jpg" for _ in range(10_000)]
    idx = PathIndex(paths)
    prefix = "/mnt/datasets/inaturalist/train_val2018/"
    assert idx.prefix == prefix
    expected = sum(len(p) - len(prefix) for p in paths) + 8 * len(paths) + len(prefix)   # ASCII: chars = bytes
    assert idx.nbytes == expected
    python = sum(sys.getsizeof(p) for p in paths)
    assert idx.nbytes * 2 <= python, (idx.nbytes, python)
    assert list(pickle.loads(pickle.dumps(idx))) == paths
    assert len(pickle.dumps(idx)) < python / 2


def write_tree(root, n=12):
    """n small PNGs in two classes; returns their paths in the loader's (sorted) order."""
    paths = []
    for i in range(n):
        path = os.path.join(root, f"c{i % 2}", f"img{i:02d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return sorted(paths)


def corrupt(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def test_file_collection_stores_a_path_index(tmp_path):
    paths = write_tree(str(tmp_path / "t"))
    train, _ = load_folders(str(tmp_path / "t"), levels=["c"])
    assert isinstance(train.paths, PathIndex) and list(train.paths) == paths
    sub = split_collection(train, [5, 0, 11], "sub")
    assert list(sub.paths) == [paths[5], paths[0], paths[11]]
    assert list(pickle.loads(pickle.dumps(sub)).paths) == list(sub.paths)


def checked_paths(monkeypatch, coll, sample):
    """The files coll.check_images(sample=...) opens, in order."""
    seen = []
    real = images.check_file
    monkeypatch.setattr(images, "check_file", lambda p: seen.append(p) or real(p))
    coll.check_images("raise", sample)
    monkeypatch.setattr(images, "check_file", real)
    return seen


def data_cfg(root, **data):
    return config_from_dict({"data": {"name": "folders", "root": root, "options": {"levels": ["c"]}, **data}}).data


def test_sampled_check(tmp_path, monkeypatch):
    root = str(tmp_path / "t")
    paths = write_tree(root)
    train, _ = load_folders(root, levels=["c"])
    assert checked_paths(monkeypatch, train, None) == paths
    assert checked_paths(monkeypatch, train, 50) == paths                  # min(S, n)
    sample = checked_paths(monkeypatch, train, 4)
    assert len(sample) == len(set(sample)) == 4 and sample == sorted(sample) and set(sample) < set(paths)
    assert checked_paths(monkeypatch, train, 4) == sample                  # seeded: the same every time

    outside = next(p for p in paths if p not in sample)
    corrupt(outside)
    with pytest.raises(DataError, match=os.path.basename(outside)):      # every image: refused up front
        prepare_data(data_cfg(root))
    train, _ = prepare_data(data_cfg(root, check_sample=4))              # the sample misses it
    i = list(train.paths).index(outside)
    assert train.image(i - 1).shape == (3, 8, 8)
    with pytest.raises(DataError, match=f"cannot decode image {outside}"):   # ... but decoding it fails loudly
        train.image(i)
    cached, _ = prepare_data(data_cfg(root, check_sample=4, options={"levels": ["c"], "cache_size": 8}))
    with pytest.raises(DataError, match=os.path.basename(outside)):
        cached.cache(threads=1)

    corrupt(sample[2])
    with pytest.raises(DataError, match=os.path.basename(sample[2])):    # inside the sample: refused up front
        prepare_data(data_cfg(root, check_sample=4))
    with pytest.raises(DataError, match="every image checked"):
        train.check_images("skip", 4)


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text,match", [
    ("data: {check_images: skip, check_sample: 100}\n", "skip needs every image checked"),
    ("data: {check_sample: 0}\n", ">= 1"),
    ("data: {check_sample: 2.5}\n", "expected int"),
])
def test_check_sample_config_errors_name_the_key(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: data.check_sample: ")


def test_check_sample_default_and_fingerprint(tmp_path):
    assert load_config(write(tmp_path, "data: {check_images: skip}\n")).data.check_sample is None
    assert load_config(write(tmp_path, "data: {check_sample: 1000}\n")).data.check_sample == 1000
    plain, sampled = config_from_dict({}), config_from_dict({"data": {"check_sample": 1000}})
    # how many images are checked is not what is trained: checkpoints and sweeps written before still match
    assert "data.check_sample" not in flat_config(to_dict(plain))
    assert config_fingerprint(to_dict(plain)) == config_fingerprint(to_dict(sampled))
