"""The compiled half of exact AP (ap_kernel.c): gather the relevant scores, count the items at or
above each in one fused pass, AP from the counts; and the kNN's top-k. Compiled on first use,
with the torch path of grafit_core.ap as the fallback and the reference (the same bits).

Why C: the count costs O(1) per item, but each torch operation is a full pass over the q x N
scores, and the torch path needs 6-8 of them per (level, ranking); one loop does it in a pass
(issue 7's budget: a level costs less than the matrix product itself). At a coarse level the
q x R work around it (R ~ N / C relevant items per query) weighs as much: torch's index
arithmetic, searchsorted and float64 temporaries cost 3x the count there (issue 14).

The library is built with the system C compiler ($CC, else cc) into ~/.cache/grafit (or
$GRAFIT_CACHE), keyed by the source's hash, written atomically (Ray workers may build at once);
with -fopenmp where the compiler has it, so that its loops run on torch's own OpenMP threads.
No compiler, a failed build or GRAFIT_AP_KERNEL=0: the torch path, with one warning.
"""
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ap_kernel.c")
# -ffp-contract=off: no fused multiply-add, so items and thresholds take the same float ops
_FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math"]
_lock = threading.Lock()
_state = {}
RANGES = 4          # row ranges per thread (_split_rows)


def _build():
    """The library built with -fopenmp (torch's OpenMP threads run its loops), else without (the
    thread pool of _split_rows runs them): a compiler without OpenMP, or a libgomp it needs that
    torch's lacks."""
    with open(_SRC, "rb") as f:
        source = f.read()
    error = None
    for flags in (_FLAGS + ["-fopenmp"], _FLAGS):
        try:
            return _load(_compiled(source, flags))
        except (OSError, subprocess.SubprocessError) as exc:
            error = exc                 # the plain build's, if that fails too
    raise error


def _compiled(source, flags):
    key = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    cache = os.environ.get("GRAFIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "grafit")
    lib = os.path.join(cache, f"ap_kernel-{key}-{platform.machine()}.so")
    if not os.path.exists(lib):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run([os.environ.get("CC", "cc"), *flags, _SRC, "-o", tmp, "-lm"], check=True,
                           capture_output=True, timeout=120)
            os.chmod(tmp, 0o755)                # mkstemp's 0600 would hide it from a shared cache
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def _load(lib):
    dll = ctypes.CDLL(lib)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    # every function starts with its row range [row0, row1): _split_rows gives one per thread
    dll.grafit_count_ge.argtypes = [i64, i64, ptr, i64, i64, ptr, i64, ptr, i64, ptr, ptr]
    dll.grafit_gather.argtypes = [i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, ctypes.c_float, ptr, i64]
    dll.grafit_ap.argtypes = [i64, i64, ptr, i64, ptr, ptr, ptr]
    dll.grafit_topk.argtypes = [i64, i64, ptr, i64, i64, i64, ptr, ptr]
    dll.grafit_openmp.restype = ctypes.c_int
    for fn in (dll.grafit_count_ge, dll.grafit_gather, dll.grafit_ap, dll.grafit_topk):
        fn.restype = ctypes.c_int
        # its twin on OpenMP threads: (threads, parts, q) instead of the row range
        par = getattr(dll, fn.__name__ + "_par")
        par.argtypes, par.restype = [ctypes.c_int, i64, i64, *fn.argtypes[2:]], ctypes.c_int
    return dll


def kernel():
    """The compiled library, or None (torch fallback); built once per process."""
    with _lock:
        if "fn" not in _state:
            _state["fn"] = None
            if os.environ.get("GRAFIT_AP_KERNEL", "1") != "0":
                try:
                    _state["fn"] = _build()
                except (OSError, subprocess.SubprocessError) as exc:
                    detail = getattr(exc, "stderr", b"") or b""
                    warnings.warn(f"grafit: AP kernel unavailable ({exc} {detail.decode()[:200]}); "
                                  "using the slower torch path")
        return _state["fn"]


def usable(scores):
    return scores.device.type == "cpu" and scores.dtype == torch.float32 and kernel() is not None


def _pool(threads):
    """A thread pool per (process, size): a forked child (a DataLoader worker) gets its own."""
    key = (os.getpid(), threads)
    with _lock:
        if _state.get("pool_key") != key:
            _state["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="grafit-ap")
            _state["pool_key"] = key
        return _state["pool"]


def _split_rows(fn, q, *args):
    """fn(row0, row1, *args) over row ranges, RANGES per thread, taken as threads free up: on a
    shared machine one descheduled thread does not hold the others up by a half. A compiled fn runs
    on torch's OpenMP threads where the library has OpenMP (its twin fn_par), else, like a Python
    fn, on a pool of as many threads (ctypes and numpy release the GIL)."""
    pool_size = max(1, torch.get_num_threads())
    parts = min(pool_size * RANGES if pool_size > 1 else 1, max(q, 1))
    par = getattr(kernel(), fn.__name__ + "_par", None) if hasattr(fn, "argtypes") else None
    if parts > 1 and par is not None and kernel().grafit_openmp():
        codes = [par(pool_size, parts, q, *args)]
    else:
        bounds = [q * t // parts for t in range(parts + 1)]
        calls = [(bounds[t], bounds[t + 1], *args) for t in range(parts) if bounds[t] < bounds[t + 1]]
        codes = list(_pool(pool_size).map(lambda a: fn(*a), calls)) if len(calls) > 1 else [fn(*c) for c in calls]
    if any(codes):
        why = {1: "out of memory", 2: "k larger than the row", 3: "a row too long"}.get(max(codes), "unknown")
        raise RuntimeError(f"grafit AP kernel: {fn.__name__} failed: {why}")


def sort_rows(x):
    """Each row of the float32 CPU tensor x sorted ascending in place (NaN last, as torch.sort):
    numpy's SIMD sort, which releases the GIL, over the threads' row ranges."""
    rows = x.numpy()

    def sort(row0, row1):
        rows[row0:row1].sort(axis=1)
        return 0

    _split_rows(sort, x.shape[0])
    return x


def _rows(scores):
    return scores if scores.stride(1) == 1 else scores.contiguous()


def _shift_args(shift, scores):
    """(logits pointer, C, coarse pointer, kept tensors) of eq. 5's shift, checked: C reads
    logits[row, coarse[item]] unchecked."""
    if shift is None:
        return None, 0, None, ()
    logits, coarse = shift[0].float().contiguous(), shift[1].long().contiguous()
    if logits.shape[0] != scores.shape[0] or coarse.shape != (scores.shape[1],):
        raise ValueError(f"shift: logits {tuple(logits.shape)} / coarse {tuple(coarse.shape)} do not fit "
                         f"scores {tuple(scores.shape)}")
    if coarse.numel() and (int(coarse.min()) < 0 or int(coarse.max()) >= logits.shape[1]):
        raise IndexError(f"coarse label out of range [0, {logits.shape[1]}): min {int(coarse.min())}, "
                         f"max {int(coarse.max())}")
    return logits.data_ptr(), logits.shape[1], coarse.data_ptr(), (logits, coarse)


def count_at_or_above(thr, scores, shift=None):
    """(q, r_max) int64: per row, #items whose score (+ shift) is >= each threshold of thr.

    thr: (q, r_max) float32 sorted per row, +inf pads last. shift: None or (logits (q, C),
    coarse (n,)) adding logits[row, coarse[item]] to each score (eq. 5).
    """
    scores, thr = _rows(scores), thr.float().contiguous()
    if thr.shape[0] != scores.shape[0]:
        raise ValueError(f"thresholds {tuple(thr.shape)} do not fit scores {tuple(scores.shape)}")
    logits, n_coarse, coarse, _keep = _shift_args(shift, scores)
    n_ge = torch.empty(thr.shape, dtype=torch.int64)
    _split_rows(kernel().grafit_count_ge, thr.shape[0], scores.data_ptr(), scores.shape[1], scores.stride(0),
                thr.data_ptr(), thr.shape[1], logits, n_coarse, coarse, n_ge.data_ptr())
    return n_ge


def gather(scores, order, start, size, pos0, r_max, pad, shift=None):
    """(q, r_max) float32: row i holds pad, then the scores (+ shift) of its relevant columns
    order[start[i] : start[i] + size[i]] from column pos0[i], then pad (grafit_core.ap's
    thresholds before the sort)."""
    scores, order = _rows(scores), order.long().contiguous()
    start, size, pos0 = (x.long().contiguous() for x in (start, size, pos0))
    q = scores.shape[0]
    # C reads these unchecked
    if order.shape != (scores.shape[1],) or not start.shape == size.shape == pos0.shape == (q,):
        raise ValueError(f"gather: order {tuple(order.shape)} / rows {tuple(start.shape)} do not fit scores "
                         f"{tuple(scores.shape)}")
    if q and (bool((start < 0).any() | (size < 0).any() | (pos0 < 0).any()) or int((start + size).max()) > len(order)
              or int((pos0 + size).max()) > r_max):
        raise IndexError("gather: a row's relevant columns fall outside the label index or the thresholds")
    logits, n_coarse, coarse, _keep = _shift_args(shift, scores)
    thr = torch.empty(q, r_max, dtype=torch.float32)
    _split_rows(kernel().grafit_gather, q, scores.data_ptr(), scores.stride(0), order.data_ptr(), start.data_ptr(),
                size.data_ptr(), pos0.data_ptr(), logits, n_coarse, coarse, pad, thr.data_ptr(), r_max)
    return thr


def average_precision(thr, n_rel, n_ge):
    """(q, 2) float64 [AP, MAP@R] from the sorted thresholds (q, r_max), #relevant (q,) and the counts
    at or above (q, r_max): grafit_core.ap._ap_from_counts in one loop, the same bits."""
    thr, n_ge, n_rel = thr.float().contiguous(), n_ge.long().contiguous(), n_rel.long().contiguous()
    if n_ge.shape != thr.shape or n_rel.shape != thr.shape[:1] or (len(n_rel) and int(n_rel.max()) > thr.shape[1]):
        raise ValueError(f"AP: thresholds {tuple(thr.shape)}, counts {tuple(n_ge.shape)}, R {tuple(n_rel.shape)}")
    ap = torch.empty(thr.shape[0], 2, dtype=torch.float64)
    _split_rows(kernel().grafit_ap, thr.shape[0], thr.data_ptr(), thr.shape[1], n_rel.data_ptr(), n_ge.data_ptr(),
                ap.data_ptr())
    return ap


def group_ap(scores, order, start, size, r_max, shift=None):
    """(q, 2) float64 [AP, MAP@R] of each row, unsharded (+inf pads): gather, sort_rows, count_at_or_above and
    average_precision, the same calls and bits. With OpenMP, one after another on torch's threads
    (the sort on the pool: numpy); without, each pool thread takes a row range through all four
    (one hand-out of ranges instead of four, with a thread idle at the end of each)."""
    scores, order = _rows(scores), order.long().contiguous()
    start, size = start.long().contiguous(), size.long().contiguous()
    q = scores.shape[0]
    pos0 = torch.zeros(q, dtype=torch.int64)
    if order.shape != (scores.shape[1],) or not start.shape == size.shape == (q,):       # C reads these unchecked
        raise ValueError(f"group_ap: order {tuple(order.shape)} / rows {tuple(start.shape)} do not fit scores "
                         f"{tuple(scores.shape)}")
    if q and (bool((start < 0).any() | (size < 0).any()) or int((start + size).max()) > len(order)
              or int(size.max()) > r_max):
        raise IndexError("group_ap: a row's relevant columns fall outside the label index or r_max")
    if kernel().grafit_openmp():
        thr = sort_rows(gather(scores, order, start, size, pos0, r_max, float("inf"), shift))
        return average_precision(thr, size, count_at_or_above(thr, scores, shift))
    logits, n_coarse, coarse, _keep = _shift_args(shift, scores)
    thr = torch.empty(q, r_max, dtype=torch.float32)
    n_ge = torch.empty(q, r_max, dtype=torch.int64)
    ap = torch.empty(q, 2, dtype=torch.float64)
    lib, rows = kernel(), thr.numpy()

    def rows_ap(row0, row1):
        lib.grafit_gather(row0, row1, scores.data_ptr(), scores.stride(0), order.data_ptr(), start.data_ptr(),
                          size.data_ptr(), pos0.data_ptr(), logits, n_coarse, coarse, float("inf"), thr.data_ptr(),
                          r_max)
        rows[row0:row1].sort(axis=1)        # numpy releases the GIL
        code = lib.grafit_count_ge(row0, row1, scores.data_ptr(), scores.shape[1], scores.stride(0), thr.data_ptr(),
                                   r_max, logits, n_coarse, coarse, n_ge.data_ptr())
        return code or lib.grafit_ap(row0, row1, thr.data_ptr(), r_max, size.data_ptr(), n_ge.data_ptr(),
                                     ap.data_ptr())

    _split_rows(rows_ap, q)
    return ap


def topk(scores, k):
    """(values, indices) of the k largest scores of each row, ordered by (-value, index): among
    equal scores the lower index first (NaN above everything, as torch.topk), so that a kNN never
    depends on how the collection is split. One pass per row through the compiled loop where it is
    usable; else torch.topk, whose order among ties is unspecified, put in that order."""
    if k == 0 or not scores.shape[0]:
        return scores.topk(k, dim=1)
    if not usable(scores):
        return _torch_topk(scores, k)
    scores = _rows(scores)
    vals = torch.empty(scores.shape[0], k, dtype=torch.float32)
    idx = torch.empty(scores.shape[0], k, dtype=torch.int64)
    _split_rows(kernel().grafit_topk, scores.shape[0], scores.data_ptr(), scores.shape[1], scores.stride(0), k,
                vals.data_ptr(), idx.data_ptr())
    return vals, idx


def _torch_topk(scores, k):
    vals, idx = scores.topk(k, dim=1)
    kth = vals[:, -1:]
    # a row where an item tied with the k-th value was left out: the lowest indices must be kept
    cut = ((scores == kth).sum(1) > (vals == kth).sum(1)).nonzero().squeeze(1)
    if cut.numel():
        full = scores[cut].sort(dim=1, descending=True, stable=True)
        vals[cut], idx[cut] = full.values[:, :k], full.indices[:, :k]
    idx, by_index = idx.sort(dim=1)
    vals, order = vals.gather(1, by_index).sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, order)
