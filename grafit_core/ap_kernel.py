"""The fused CPU counting loop of exact AP (ap_kernel.c), compiled on first use, with the torch
path of grafit_core.ap as the fallback and the reference.

Why C: the count costs O(1) per item, but each torch operation is a full pass over the q x N
scores, and the torch path needs 6-8 of them per (level, ranking); one loop does it in a pass
(issue 7's budget: a level costs less than the matrix product itself).

The library is built with the system C compiler ($CC, else cc) into ~/.cache/grafit (or
$GRAFIT_CACHE), keyed by the source's hash, written atomically (Ray workers may build at once).
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


def _build():
    with open(_SRC, "rb") as f:
        source = f.read()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    cache = os.environ.get("GRAFIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "grafit")
    lib = os.path.join(cache, f"ap_kernel-{key}-{platform.machine()}.so")
    if not os.path.exists(lib):
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run([os.environ.get("CC", "cc"), *_FLAGS, _SRC, "-o", tmp, "-lm"], check=True,
                           capture_output=True, timeout=120)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    fn = ctypes.CDLL(lib).grafit_count_ge
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, i64, i64, ptr, i64, ptr, i64, ptr, ptr]
    fn.restype = ctypes.c_int
    return fn


def kernel():
    """The compiled function, or None (torch fallback); built once per process."""
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
    if _state.get("pool_size") != threads:
        _state["pool"] = ThreadPoolExecutor(threads, thread_name_prefix="grafit-ap")
        _state["pool_size"] = threads
    return _state["pool"]


def count_at_or_above(thr, scores, shift=None):
    """(q, r_max) int64: per row, #items whose score (+ shift) is >= each threshold of thr.

    thr: (q, r_max) float32 sorted per row, +inf pads last. shift: None or (logits (q, C),
    coarse (n,)) adding logits[row, coarse[item]] to each score (eq. 5). Rows are split across
    torch's thread count; ctypes releases the GIL during each call.
    """
    fn = kernel()
    q, r_max = thr.shape
    n = scores.shape[1]
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    thr = thr.contiguous()
    logits, coarse = shift if shift is not None else (None, None)
    if shift is not None:
        logits, coarse = logits.float().contiguous(), coarse.long().contiguous()
    n_ge = torch.empty(q, r_max, dtype=torch.int64)
    args = (scores.data_ptr(), n, scores.stride(0))
    tail = (thr.data_ptr(), r_max, logits.data_ptr() if logits is not None else None,
            logits.shape[1] if logits is not None else 0, coarse.data_ptr() if coarse is not None else None,
            n_ge.data_ptr())
    threads = max(1, min(torch.get_num_threads(), q))
    bounds = [q * t // threads for t in range(threads + 1)]
    calls = [(*args, bounds[t], bounds[t + 1], *tail) for t in range(threads) if bounds[t] < bounds[t + 1]]
    codes = list(_pool(threads).map(lambda a: fn(*a), calls)) if len(calls) > 1 else [fn(*c) for c in calls]
    if any(codes):
        raise MemoryError("grafit AP kernel: out of memory")
    return n_ge
