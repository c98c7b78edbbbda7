"""Collections of images: decoded files (cached in memory or streamed from disk) or a tensor.

Shared by every loader. The classes hold only plain data (a compact path index, label arrays, an
optional uint8 tensor), never file handles or thread pools, so they pickle cheaply to worker processes.
Call `cache()` before forking workers so the decoding happens once, not once per worker.
"""
from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from grafit_core.data.hierarchy import Collection, Hierarchy
from grafit_core.errors import DataError

_MODES = {1: "L", 3: "RGB"}
_CHUNK = 1 << 18                    # items per vectorised step: bounds the temporaries of PathIndex


class PathIndex(Sequence):
    """The file paths of a collection as a read-only sequence of str, stored compactly.

    Why: a list of N Python strings costs ~100+ bytes a path (object header, the full path
    repeated), ~10 GB per worker at N = 10^8. Here the longest common directory prefix is kept
    once and the rest of each path as UTF-8 in one uint8 buffer with int64 end offsets: about
    (relative path length + 8) bytes a path, two numpy arrays that pickle as two blocks.
    `idx[i]` rebuilds exactly the original string (any str: lone surrogates use surrogatepass).
    """

    def __init__(self, paths: Iterable[str]):
        paths = paths if isinstance(paths, (list, tuple)) else list(paths)
        prefix = os.path.commonprefix(paths) if paths else ""
        self.prefix = prefix[:max(prefix.rfind("/"), prefix.rfind(os.sep)) + 1]   # whole folders only
        cut = len(self.prefix)
        rel = [p[cut:].encode("utf-8", "surrogatepass") for p in paths]
        self.ends = np.cumsum(np.fromiter(map(len, rel), dtype=np.int64, count=len(rel)), dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(rel), dtype=np.uint8)

    @classmethod
    def _from_parts(cls, prefix: str, buffer: np.ndarray, ends: np.ndarray) -> "PathIndex":
        out = cls.__new__(cls)
        out.prefix, out.buffer, out.ends = prefix, buffer, ends
        return out

    def __len__(self) -> int:
        return len(self.ends)

    def _decode(self, start: int, end: int) -> str:
        return self.prefix + self.buffer[start:end].tobytes().decode("utf-8", "surrogatepass")

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n = len(self)
        i = operator.index(i)       # numpy integers too; a float raises TypeError, as for a list
        if not -n <= i < n:
            raise IndexError(f"path index {i} out of range for {n} paths")
        i %= n
        return self._decode(int(self.ends[i - 1]) if i else 0, int(self.ends[i]))

    def __iter__(self):
        start = 0
        for lo in range(0, len(self), _CHUNK):          # plain ints: no numpy scalar per path
            for end in self.ends[lo:lo + _CHUNK].tolist():
                yield self._decode(start, end)
                start = end

    def take(self, indices) -> "PathIndex":
        """The paths at `indices` (negative ones count from the end), in that order, without
        building their strings: the byte ranges are gathered from the buffer, a chunk at a time."""
        n = len(self)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"path index out of range for {n} paths")
        idx = np.where(idx < 0, idx + n, idx)
        starts = np.concatenate(([0], self.ends[:-1]))[idx]
        lens = self.ends[idx] - starts
        ends = np.cumsum(lens, dtype=np.int64)
        out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint8)
        for lo in range(0, len(idx), _CHUNK):
            s, ln, e = starts[lo:lo + _CHUNK], lens[lo:lo + _CHUNK], ends[lo:lo + _CHUNK]
            base = int(e[0] - ln[0])                       # where this chunk starts in `out`
            # byte t of the chunk comes from its path's start + (t - that path's start in `out`)
            src = np.repeat(s - (e - ln - base), ln) + np.arange(int(e[-1]) - base)
            out[base:int(e[-1])] = self.buffer[src]
        return PathIndex._from_parts(self.prefix, out, ends)

    @property
    def nbytes(self) -> int:
        """Bytes held: the buffer, the offsets and the prefix (not the Python object headers)."""
        return self.buffer.nbytes + self.ends.nbytes + len(self.prefix.encode("utf-8", "surrogatepass"))

    def __eq__(self, other) -> bool:
        if isinstance(other, PathIndex) and other.prefix == self.prefix:   # same split: compare the arrays
            return np.array_equal(self.ends, other.ends) and np.array_equal(self.buffer, other.buffer)
        if isinstance(other, (PathIndex, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None                 # compared by content, like a list

    def __repr__(self) -> str:
        return f"PathIndex({len(self)} paths under {self.prefix!r}, {self.nbytes} bytes)"


def decode_image(path: str, channels: int, size: int | None = None, invert: bool = False) -> torch.Tensor:
    """Decode one file to a uint8 tensor C x H x W (resized to size x size, antialiased, if given).

    Raises DataError naming the file when it cannot be read or decoded: with data.check_sample,
    an image outside the checked sample may be broken and must fail loudly here."""
    mode = _MODES[channels]
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                # BILINEAR in PIL widens its kernel when shrinking, i.e. it is antialiased.
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, zlib.error, struct.error, ...)
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
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
                 paths: Sequence[str], channels: int, cache_size: int | None, invert: bool = False):
        super().__init__(name, hierarchy, labels)
        if channels not in _MODES:
            raise DataError(f"{name}: channels must be 1 or 3, got {channels}")
        if labels and len(paths) != len(next(iter(labels.values()))):
            raise DataError(f"{name}: {len(paths)} paths but "
                            f"{len(next(iter(labels.values())))} labels")
        self.paths = paths if isinstance(paths, PathIndex) else PathIndex(paths)   # immutable: shared
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

    def check_images(self, on_error: str = "raise", sample: int | None = None) -> "FileCollection":
        """Check the files; "raise" -> DataError naming the first bad file, "skip" -> drop them.

        sample: check only a seeded random sample of min(sample, N) files (data.check_sample), in
        file order; a bad file outside it fails later, when decoded. "skip" needs every file checked.
        """
        if on_error not in ("raise", "skip"):
            raise DataError(f"{self.name}: on_error must be 'raise' or 'skip', got {on_error!r}")
        if sample is not None and on_error == "skip":
            raise DataError(f"{self.name}: skipping bad images needs every image checked, "
                            f"not a sample of {sample}")
        n = len(self)
        if sample is None or sample >= n:
            items: Iterable[tuple[int, str]] = enumerate(self.paths)
        else:   # fixed seed: every worker and every rerun checks the same files
            order = np.sort(np.random.default_rng(0).choice(n, size=max(sample, 0), replace=False)).tolist()
            items = ((i, self.paths[i]) for i in order)
        bad: list[int] = []
        for i, path in items:
            why = check_file(path)
            if why is None:
                continue
            if on_error == "raise":
                raise DataError(f"{self.name}: bad image {path}: {why}")
            bad.append(i)
        if not bad:
            return self
        keep = np.ones(n, dtype=bool)
        keep[bad] = False
        kept = split_collection(self, np.flatnonzero(keep), self.name)
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
        sub = FileCollection(name, coll.hierarchy, labels, coll.paths.take(idx),
                             coll.channels, coll.cache_size, coll.invert)
        if coll._cache is not None:
            sub._cache = coll._cache[torch.from_numpy(idx)]
        sub.skipped = list(coll.skipped)
        return sub
    if isinstance(coll, TensorCollection):
        return TensorCollection(name, coll.hierarchy, labels, coll.images[torch.from_numpy(idx)])
    return SubsetCollection(name, coll, idx)
