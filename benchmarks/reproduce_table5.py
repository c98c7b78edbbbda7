"""Issue 5's reproduction table: Table 5-style rows on Omniglot x 3 seeds, plus equal wall time.

    .venv/bin/python benchmarks/reproduce_table5.py [--spec jobs/table5/reproduction.yaml]

Each (row, seed) cell trains in this process with `grafit_core.engine.fit` (the function every
Ray Train worker runs) and is appended to the results JSON as soon as it ends, so a stopped run
resumes where it was. At the end it prints the table (mean ± std over seeds, character level)
and whether the issue's goals hold.
"""
import argparse
import fcntl
import json
import os
import statistics
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grafit_core.config import load_config  # noqa: E402
from grafit_core.data import prepare_data  # noqa: E402
from grafit_core.engine import fit  # noqa: E402

LEVEL = "character"
KEYS = ["knn_top1", "map_cosine", "map_cond", "map_oracle"]


def cells(spec: dict):
    """(label, job file, overrides, seed) for every cell, the spec's `run_first` rows first."""
    rows = {label: (job, dict(spec["budget"])) for label, job in spec["rows"].items()}
    for label, entry in spec.get("equal_time", {}).items():
        entry = dict(entry)
        rows[label] = (entry.pop("job"), {**spec["budget"], **entry})
    first = spec.get("run_first", [])
    for label in first + [r for r in rows if r not in first]:
        job, overrides = rows[label]
        for seed in spec["seeds"]:
            yield label, job, overrides, seed


def save(path: str, results: dict) -> None:
    """Write results merged with the cells already on disk: two runs (e.g. `--only` splits of one
    table) can share a file without one dropping the other's cells."""
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = json.load(open(path)) if os.path.exists(path) else {}
        results.update({k: v for k, v in on_disk.items() if k not in results})
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        os.replace(tmp, path)                 # a killed run never leaves half a file


def cached_data(cfg, cache: dict):
    """(train, query) of cfg's data, read once per (root, image size): every row shares the split."""
    key = (cfg.data.root, cfg.data.image_size)
    if key not in cache:
        cache[key] = prepare_data(cfg.data)
    return cache[key]


def run_cell(job_path: str, overrides: dict, seed: int, data_cache: dict) -> dict:
    cfg = load_config(job_path, {**overrides, "seed": seed})
    train, query = cached_data(cfg, data_cache)
    wall, cpu = time.time(), time.process_time()
    res = fit(cfg, train, query, log=lambda s: print("   ", s, flush=True))
    return {"metrics": res.metrics, "epochs": cfg.optim.epochs, "seed": seed,
            "train_s": sum(h["epoch_time_s"] for h in res.history),
            "wall_s": time.time() - wall, "cpu_s": time.process_time() - cpu}


def summary(results: dict, spec: dict) -> tuple[list, dict]:
    """Rows of (label, n, epochs, mean±std per key, minutes) and the means by label."""
    table, means = [], {}
    labels = list(spec["rows"]) + list(spec.get("equal_time", {}))
    for label in labels:
        runs = [v for k, v in results.items() if k.rsplit("/", 1)[0] == label]
        if not runs:
            continue
        row = [label, str(len(runs)), str(runs[0]["epochs"])]
        means[label] = {}
        for k in KEYS:
            vals = [100 * r["metrics"][f"{k}/{LEVEL}"] for r in runs]
            means[label][k] = statistics.mean(vals)
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            row.append(f"{means[label][k]:.1f} ± {sd:.1f}")
        row.append(f"{statistics.mean(r['cpu_s'] for r in runs) / 60:.1f}")
        table.append(row)
    return table, means


def print_goals(means: dict) -> None:
    g, c, s = (means.get(x) for x in ("kNN + inst MLP (Grafit)", "CE", "kNN MLP (SNCA+)"))
    if not (g and c):
        return
    checks = [("Grafit >= CE + 5 kNN top-1", g["knn_top1"] - c["knn_top1"] >= 5),
              ("Grafit >= CE + 10 mAP cosine", g["map_cosine"] - c["map_cosine"] >= 10),
              ("conditioned >= cosine + 1 mAP (Grafit)", g["map_cond"] - g["map_cosine"] >= 1),
              ("oracle >= conditioned (Grafit)", g["map_oracle"] >= g["map_cond"])]
    if s:
        checks.append(("CE <= SNCA+ <= Grafit (kNN and mAP)",
                       all(c[k] <= s[k] <= g[k] for k in ("knn_top1", "map_cosine"))))
    for name, ok in checks:
        print(f"  [{'x' if ok else ' '}] {name}")


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=os.path.join(ROOT, "jobs", "table5", "reproduction.yaml"),
                        help="rows, seeds and the fixed budget")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "table5_omniglot.json"),
                        help="results JSON; cells already in it are not run again")
    parser.add_argument("--only", default=None, help="run only the rows whose label contains this text")
    parser.add_argument("--summary", action="store_true", help="print the table from the JSON, train nothing")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    args = parser.parse_args(argv)
    with open(args.spec) as f:
        spec = yaml.safe_load(f)
    here = os.path.dirname(os.path.abspath(args.spec))
    results = json.load(open(args.output)) if os.path.exists(args.output) else {}
    data_cache: dict = {}
    for label, job, overrides, seed in ([] if args.summary else cells(spec)):
        key = f"{label}/{seed}"
        if key in results or (args.only and args.only not in label):
            continue
        print(f"== {key} ({job}, {overrides})", flush=True)
        results[key] = run_cell(os.path.join(here, job), overrides, seed, data_cache)
        results[key]["job"] = job
        save(args.output, results)
    table, means = summary(results, spec)
    # CPU minutes of the process (training + evaluation): robust to other load on the machine
    head = ["row", "seeds", "epochs"] + [f"{k} %" for k in KEYS] + ["CPU min"]
    if args.markdown:
        for i, r in enumerate([head] + table):
            print("| " + " | ".join(map(str, r)) + " |")
            if i == 0:
                print("|" + "---|" * len(r))
    else:
        widths = [max(len(str(r[i])) for r in table + [head]) for i in range(len(head))]
        for r in [head] + table:
            print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
    print_goals(means)
    return 0


if __name__ == "__main__":
    sys.exit(run())
