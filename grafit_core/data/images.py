"""Collections of images: decoded files (cached in memory or streamed from disk) or a tensor.

Shared by every loader. The classes hold only plain data (paths, label arrays, an optional
uint8 tensor), never file handles or thread pools, so they pickle cheaply to worker processes.
Call `cache()` before forking workers so the decoding happens once, not once per worker.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from grafit_core.data.hierarchy import Collection, Hierarchy
from grafit_core.errors import DataError

_MODES = {1: "L", 3: "RGB"}


def decode_image(path: str, channels: int, size: int | None = None, invert: bool = False) -> torch.Tensor:
    """Decode one file to a uint8 tensor C x H x W (resized to size x size, antialiased, if given)."""
    try:
        with Image.open(path) as im:
            im = im.convert(_MODES[channels])
            if size is not None and im.size != (size, size):
                # BILINEAR in PIL widens its kernel when shrinking, i.e. it is antialiased.
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    return 255 - t if invert else t


def _jpeg_is_complete(path: str) -> bool:
    """A JPEG ends with the EOI marker FFD9 (some writers append a few padding bytes)."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 64))
        return b"\xff\xd9" in f.read()


def check_file(path: str) -> str | None:
    """Return why `path` is not a readable image, or None when it looks fine.

    Cheap: reads the header; for PNG walks the chunks with their CRCs (no inflating);
    for JPEG looks for the end marker; other formats are decoded fully.
    """
    if not os.path.isfile(path):
        return "missing file"
    if os.path.getsize(path) == 0:
        return "empty file"
    try:
        with Image.open(path) as im:
            fmt = im.format
            if im.size[0] <= 0 or im.size[1] <= 0:
                return f"bad size {im.size}"
            if fmt == "PNG":
                im.verify()
            elif fmt == "JPEG":
                if not _jpeg_is_complete(path):
                    return "truncated JPEG (no end marker)"
            else:
                im.load()
    except Exception as e:  # PIL raises many types (SyntaxError, OSError, struct.error, ...)
        return f"{type(e).__name__}: {e}"
    return None


class FileCollection(Collection):
    """Images stored as files. With `cache_size`, all are decoded once to S x S and kept in memory."""

    def __init__(self, name: str, hierarchy: Hierarchy, labels: dict[str, np.ndarray],
                 paths: list[str], channels: int, cache_size: int | None, invert: bool = False):
        super().__init__(name, hierarchy, labels)
        if channels not in _MODES:
            raise DataError(f"{name}: channels must be 1 or 3, got {channels}")
        if labels and len(paths) != len(next(iter(labels.values()))):
            raise DataError(f"{name}: {len(paths)} paths but "
                            f"{len(next(iter(labels.values())))} labels")
        self.paths = list(paths)
        self.channels = channels
        self.cache_size = cache_size
        self.invert = invert          # 255 - x: e.g. bright ink on black for pen strokes
        self.skipped: list[str] = []
        self._cache: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def cache(self, threads: int | None = None) -> "FileCollection":
        """Decode every image into one N x C x S x S uint8 tensor (no-op when streaming)."""
        if self.cache_size is None or self._cache is not None:
            return self
        n, s = len(self.paths), self.cache_size
        out = torch.empty((n, self.channels, s, s), dtype=torch.uint8)

        def fill(i: int) -> None:
            out[i] = decode_image(self.paths[i], self.channels, s, self.invert)

        # PIL releases the GIL while inflating, so threads help even for small PNGs.
        with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(fill, range(n), chunksize=256))
        self._cache = out
        return self

    def image(self, i: int) -> torch.Tensor:
        if self.cache_size is None:
            return decode_image(self.paths[i], self.channels, None, self.invert)
        if self._cache is None:
            self.cache()
        return self._cache[i]

    def check_images(self, on_error: str = "raise") -> "FileCollection":
        """Check every file; "raise" -> DataError naming the first bad file, "skip" -> drop them."""
        if on_error not in ("raise", "skip"):
            raise DataError(f"{self.name}: on_error must be 'raise' or 'skip', got {on_error!r}")
        bad: list[int] = []
        for i, path in enumerate(self.paths):
            why = check_file(path)
            if why is None:
                continue
            if on_error == "raise":
                raise DataError(f"{self.name}: bad image {path}: {why}")
            bad.append(i)
        if not bad:
            return self
        drop = set(bad)
        keep = [i for i in range(len(self)) if i not in drop]
        kept = split_collection(self, keep, self.name)
        kept.skipped = self.skipped + [self.paths[i] for i in bad]
        return kept


class TensorCollection(Collection):
    """Images already in memory as one uint8 tensor N x C x H x W."""

    def __init__(self, name: str, hierarchy: Hierarchy, labels: dict[str, np.ndarray],
                 images: torch.Tensor):
        super().__init__(name, hierarchy, labels)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"{name}: images must be uint8 N x C x H x W, "
                            f"got {images.dtype} {tuple(images.shape)}")
        if labels and images.shape[0] != len(next(iter(labels.values()))):
            raise DataError(f"{name}: {images.shape[0]} images but "
                            f"{len(next(iter(labels.values())))} labels")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def image(self, i: int) -> torch.Tensor:
        return self.images[i]


class SubsetCollection(Collection):
    """A view on the samples `indices` of any other collection (fallback of split_collection)."""

    def __init__(self, name: str, base: Collection, indices: Sequence[int]):
        idx = np.asarray(indices, dtype=np.int64)
        super().__init__(name, base.hierarchy, {k: v[idx] for k, v in base.labels.items()})
        self.base = base
        self.indices = idx

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, i: int) -> torch.Tensor:
        return self.base.image(int(self.indices[i]))


def split_collection(coll: Collection, indices: Sequence[int], name: str) -> Collection:
    """The samples `indices` of `coll`, in that order, as a collection of the same kind."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= len(coll)):
        raise DataError(f"{coll.name}: subset index out of range [0, {len(coll)})")
    labels = {k: v[idx] for k, v in coll.labels.items()}
    if isinstance(coll, FileCollection):
        sub = FileCollection(name, coll.hierarchy, labels, [coll.paths[i] for i in idx],
                             coll.channels, coll.cache_size, coll.invert)
        if coll._cache is not None:
            sub._cache = coll._cache[torch.from_numpy(idx)]
        sub.skipped = list(coll.skipped)
        return sub
    if isinstance(coll, TensorCollection):
        return TensorCollection(name, coll.hierarchy, labels, coll.images[torch.from_numpy(idx)])
    return SubsetCollection(name, coll, idx)
