"""The README's table of coarse classes never seen in training (issue 16): mean ± std over seeds of
kNN top-1, mAP and MAP@R on the trained alphabets and on the held-out ones, from the JSON files that
`grafit local jobs/unseen/omniglot.yaml --output ...` wrote (see the job file's header).

    .venv/bin/python benchmarks/unseen_table.py [--results benchmarks/results/unseen]
"""
import argparse
import glob
import json
import os
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = [("knn_top1", "kNN top-1"), ("map_cosine", "mAP"), ("map_at_r", "MAP@R")]


def cell(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def table(runs: list[dict], level: str) -> str:
    """One row per (method, seen / unseen), one column per metric at `level`, % over the seeds."""
    methods = list(runs[0]["results"])
    head = [f"{name} {level}" for _, name in COLUMNS]
    lines = ["| method | classes | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for method in methods:
        for part, suffix in (("trained on", ""), ("never seen", "/unseen")):
            cells = [cell([r["results"][method]["metrics"][f"{key}/{level}{suffix}"] for r in runs])
                     for key, _ in COLUMNS]
            lines.append(f"| {method} | {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "unseen"),
                   help="folder of the seed*.json files (default benchmarks/results/unseen)")
    args = p.parse_args()
    files = sorted(glob.glob(os.path.join(args.results, "seed*.json")))
    if not files:
        raise SystemExit(f"{args.results}: no seed*.json yet (run the job file's command first)")
    runs = [json.load(open(f)) for f in files]
    print(f"{len(runs)} seed(s): {', '.join(os.path.basename(f) for f in files)}\n")
    for level in ("character", "alphabet"):
        print(table(runs, level) + "\n")


if __name__ == "__main__":
    main()
