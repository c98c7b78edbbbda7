"""Peak memory of the one-pass evaluation at a coarse level: does it stay within the chunk budget?

    .venv/bin/python benchmarks/eval_memory.py [--sizes 100000,400000] [--classes 5] [--queries 1000]

Per N, a fresh subprocess builds an N x d collection and Q queries with C classes (R ~ N / C
relevant items per query: a coarse level), runs grafit_core.metrics.evaluate_pass once (kNN
k = 20 + cosine mAP) and reports its peak RSS growth (VmHWM, reset just before the pass) against
the bound: the 128 MB chunk budget (grafit_core.ap.CHUNK_BYTES) plus the embeddings' size (the
pass holds one normalised copy of them).
"""
import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def measure(n, n_q, d, classes):
    """In the subprocess: (peak RSS growth, embeddings) in bytes."""
    import torch

    from grafit_core.distributed import DistContext
    from grafit_core.metrics import Ranking, evaluate_pass
    g = torch.Generator().manual_seed(0)
    coll, query = torch.empty(n, d), torch.empty(n_q, d)
    coll.normal_(generator=g)
    query.normal_(generator=g)
    lab, qlab = {"l": torch.arange(n) % classes}, {"l": torch.arange(n_q) % classes}

    def run(c, labels):
        evaluate_pass(query, c, 0, labels, qlab, {"l": classes}, DistContext(), votes={("l", 20, 0.05)},
                      ap_levels=["l"], rankings={"cosine": Ranking()})

    run(coll[:2000], {"l": lab["l"][:2000]})      # compiled loop, thread pool, allocator: not the pass's own
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (the peak) to the current RSS
        f.write("5")
    before = _kib("VmRSS:")
    run(coll, lab)
    return (_kib("VmHWM:") - before) * 1024, (coll.numel() + query.numel()) * 4


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,400000", help="collection sizes N, comma-separated")
    p.add_argument("--classes", type=int, default=5, help="classes of the level (R ~ N / classes; default 5)")
    p.add_argument("--queries", type=int, default=1000, help="queries Q (default 1000)")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension d (default 128)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        growth, emb = measure(int(args.sizes), args.queries, args.dim, args.classes)
        print(growth, emb)
        return 0
    from grafit_core.ap import CHUNK_BYTES
    print(f"one pass (kNN k = 20 + cosine mAP), Q = {args.queries}, d = {args.dim}, {args.classes} classes; "
          f"bound = {CHUNK_BYTES >> 20} MB + embeddings")
    ok = True
    for n in (int(x) for x in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", "--sizes", str(n), "--queries", str(args.queries),
                              "--dim", str(args.dim), "--classes", str(args.classes)],
                             capture_output=True, text=True, check=True)
        growth, emb = map(int, out.stdout.split())
        bound = CHUNK_BYTES + emb
        ok &= growth <= bound
        print(f"N = {n:>9,}  R ~ {n // args.classes:>7,}  peak RSS growth {growth / 2**20:7.1f} MB  "
              f"bound {bound / 2**20:7.1f} MB (embeddings {emb / 2**20:.1f} MB)  {'ok' if growth <= bound else 'OVER'}",
              flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
