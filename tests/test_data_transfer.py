"""Transfer sets in torchvision's on-disk layouts (Flowers-102, Stanford Cars, Food-101), written
small by the tests in the real formats (.mat files through scipy, json, JPEGs)."""
import json
import os

import numpy as np
import pytest
import scipy.io
from PIL import Image

from grafit_core.data import load_dataset
from grafit_core.errors import DataError


def jpg(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (20, 16), (value, 255 - value, 7)).save(path, "JPEG", quality=95)


def write_flowers(root):
    base = os.path.join(root, "flowers-102")
    labels = [1, 2, 3, 1, 2, 3, 3, 1, 2]                         # image i (1-based) -> class
    for i in range(1, 10):
        jpg(os.path.join(base, "jpg", f"image_{i:05d}.jpg"), 20 * i)
    scipy.io.savemat(os.path.join(base, "imagelabels.mat"), {"labels": np.array([labels], dtype=np.uint8)})
    scipy.io.savemat(os.path.join(base, "setid.mat"), {"trnid": np.array([[1, 2, 3]], dtype=np.uint16),
                                                       "valid": np.array([[4, 5]], dtype=np.uint16),
                                                       "tstid": np.array([[6, 7, 8, 9]], dtype=np.uint16)})
    return base, labels


def test_flowers102(tmp_path):
    base, labels = write_flowers(str(tmp_path))
    train, test = load_dataset("flowers102", str(tmp_path), {})
    assert train.hierarchy.levels == ["class"] and len(train) == 5 and len(test) == 4
    names = train.hierarchy.classes["class"]
    assert [names[i] for i in train.labels_at("class")] == ["1", "2", "3", "1", "2"]
    assert [names[i] for i in test.labels_at("class")] == ["3", "3", "1", "2"]
    assert train.image(3).shape == (3, 16, 20) and int(train.image(0)[0, 0, 0]) in range(15, 26)
    train, _ = load_dataset("flowers102", base, {"with_val": False})  # the folder itself, no val images
    assert len(train) == 3
    scipy.io.savemat(os.path.join(base, "setid.mat"), {"trnid": np.array([[1, 12]]), "valid": np.array([[4]]),
                                                       "tstid": np.array([[6]])})
    with pytest.raises(DataError, match="trnid lists image 12, beyond the 9 labels"):
        load_dataset("flowers102", str(tmp_path), {})


def write_cars(root):
    base = os.path.join(root, "stanford_cars")
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], dtype=object)
    os.makedirs(os.path.join(base, "devkit"))
    scipy.io.savemat(os.path.join(base, "devkit", "cars_meta.mat"), {"class_names": names[None]})

    def annos(path, folder, rows):
        rec = np.zeros((1, len(rows)), dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
                                                ("bbox_y2", "O"), ("class", "O"), ("fname", "O")])
        for i, (fname, cls) in enumerate(rows):
            rec[0, i] = (1, 1, 10, 10, cls, fname)
            jpg(os.path.join(base, folder, fname), 40 * i)
        scipy.io.savemat(path, {"annotations": rec})

    annos(os.path.join(base, "devkit", "cars_train_annos.mat"), "cars_train",
          [("00001.jpg", 1), ("00002.jpg", 2), ("00003.jpg", 2)])
    annos(os.path.join(base, "cars_test_annos_withlabels.mat"), "cars_test", [("00001.jpg", 2), ("00002.jpg", 1)])
    return base


def test_stanford_cars(tmp_path):
    base = write_cars(str(tmp_path))
    train, test = load_dataset("stanford_cars", str(tmp_path), {})
    names = train.hierarchy.classes["class"]
    assert [names[i] for i in train.labels_at("class")] == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012",
                                                            "Acura RL Sedan 2012"]
    assert [names[i] for i in test.labels_at("class")] == ["Acura RL Sedan 2012", "AM General Hummer SUV 2000"]
    assert test.image(1).shape == (3, 16, 20)
    os.remove(os.path.join(base, "cars_test", "00002.jpg"))
    with pytest.raises(DataError, match="Stanford Cars: missing .*cars_test/00002.jpg"):
        load_dataset("stanford_cars", str(tmp_path), {})


def test_food101(tmp_path):
    base = os.path.join(str(tmp_path), "food-101")
    split = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "bibimbap": ["bibimbap/3"]},
             "test": {"bibimbap": ["bibimbap/4"], "apple_pie": ["apple_pie/5"]}}
    os.makedirs(os.path.join(base, "meta"))
    open(os.path.join(base, "meta", "classes.txt"), "w").write("apple_pie\nbibimbap\n")
    for name, listing in split.items():
        json.dump(listing, open(os.path.join(base, "meta", f"{name}.json"), "w"))
        for keys in listing.values():
            for k in keys:
                jpg(os.path.join(base, "images", f"{k}.jpg"), 30)
    train, test = load_dataset("food101", str(tmp_path), {})
    names = train.hierarchy.classes["class"]
    assert [names[i] for i in train.labels_at("class")] == ["apple_pie", "apple_pie", "bibimbap"]
    assert [names[i] for i in test.labels_at("class")] == ["bibimbap", "apple_pie"]
    json.dump({"pizza": ["pizza/9"]}, open(os.path.join(base, "meta", "test.json"), "w"))
    with pytest.raises(DataError, match="class 'pizza' is not in .*classes.txt"):
        load_dataset("food101", str(tmp_path), {})
