"""Omniglot coarse-to-fine at a small CPU budget: train with alphabet labels only, test on characters.

    .venv/bin/python benchmarks/omniglot_methods.py [--set optim.epochs=5] [--methods grafit,snca+,ce]

Prints, for each method, character-level kNN top-1 and mAP (cosine, conditioned, oracle), and
Grafit's margin over the CE baseline. A benchmark, not a test: its numbers go in the README.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from orchestrator.cli import main as grafit  # noqa: E402


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "jobs", "omniglot.yaml"),
                        help="job file (default: the README's Omniglot job)")
    parser.add_argument("--methods", default="grafit,snca+,ce", help="methods to compare")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. optim.epochs=5 (repeatable)")
    parser.add_argument("--output", default=os.path.join(ROOT, "runs", "bench_omniglot.json"),
                        help="where the metrics JSON goes")
    args = parser.parse_args(argv)
    start = time.time()
    sets = [x for s in args.set for x in ("--set", s)]
    rc = grafit(["local", args.config, "--methods", args.methods, "--output", args.output, *sets])
    if rc:
        return rc
    results = json.load(open(args.output))["results"]
    print(f"\n== character level, trained on alphabets ({(time.time() - start) / 60:.1f} min on "
          f"{os.cpu_count()} CPUs) ==")
    keys = ["knn_top1/character", "map_cosine/character", "map_cond/character", "map_oracle/character"]
    print(f"{'method':12s}" + "".join(f"{k.split('/')[0]:>13s}" for k in keys))
    for name, res in results.items():
        print(f"{name:12s}" + "".join(f"{100 * res['metrics'][k]:13.1f}" for k in keys))
    if "grafit" in results and "ce" in results:
        g, c = results["grafit"]["metrics"], results["ce"]["metrics"]
        print("grafit - ce " + "".join(f"{100 * (g[k] - c[k]):+13.1f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(run())
