"""Does the instance loss pay with more budget? (issue 16, part 3.) Collects the finished trials of
the 30-epoch sweeps (jobs/sweeps/instance_budget.yaml: SNCA+ and Grafit; instance_budget_ce.yaml:
CE and CE + inst) into benchmarks/results/instance_budget/ as they land, and prints the table.

    .venv/bin/grafit sweep jobs/sweeps/instance_budget.yaml --num-cpus 1      # resumable
    .venv/bin/python benchmarks/instance_budget.py --collect runs/tune/trials  # after (or during) it
    .venv/bin/python benchmarks/instance_budget.py                             # the README's table

A collected file is the trial's stored reports (`trial.json`: one per epoch, then the final
metrics); copied back to `<storage>/trials/<sweep>-<key>/trial.json`, a rerun of the sweep replays
it instead of training it again.
"""
import argparse
import itertools
import json
import os
import shutil
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results", "instance_budget")
SWEEPS = ("instance_budget.yaml", "instance_budget_ce.yaml")
LEVEL = "character"
LABELS = {"method.name=snca+": "SNCA+", "method.name=grafit": "Grafit", "method.w_inst=0.0": "CE",
          "method.w_inst=1.0": "CE + inst"}


def trials(sweep_file: str):
    """(row label, seed, trial folder name) of every configuration of a grid sweep."""
    from orchestrator.job import job_with, load_job
    from orchestrator.trials import trial_key
    job = load_job(os.path.join(ROOT, "jobs", "sweeps", sweep_file))
    space = {key: spec["grid"] for key, spec in job.sweep.space.items()}
    for values in itertools.product(*space.values()):
        params = dict(zip(space, values))
        label = ", ".join(f"{k}={v}" for k, v in params.items() if k != "seed")
        label = LABELS.get(label, label)
        yield label, params["seed"], f"{job.config.name}-{trial_key(job_with(job, params))}"


def collect(trials_dir: str) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    for sweep in SWEEPS:
        for _, _, folder in trials(sweep):
            src = os.path.join(trials_dir, folder, "trial.json")
            dst = os.path.join(RESULTS, f"{folder}.json")
            if os.path.exists(src) and not os.path.exists(dst):
                shutil.copyfile(src, dst)
                print(f"collected {dst}")


def cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * spread:.{digits}f}"


def table() -> str:
    lines = ["| row | seeds | epochs | kNN top-1 | mAP cosine | mAP conditioned | MAP@R | training min per run |",
             "|---|---|---|---|---|---|---|---|"]
    for sweep in SWEEPS:
        rows: dict[str, list[dict]] = {}
        for label, seed, folder in trials(sweep):
            path = os.path.join(RESULTS, f"{folder}.json")
            if os.path.exists(path):
                reports = json.load(open(path))["reports"]
                rows.setdefault(label, []).append({**reports[-1], "train_s": sum(r.get("epoch_time_s", 0.0)
                                                                                 for r in reports[:-1])})
        for label, done in rows.items():
            m = [f"{k}/{LEVEL}" for k in ("knn_top1", "map_cosine", "map_cond", "map_at_r")]
            cells = [cell([r[k] for r in done]) if all(k in r for r in done) else "-" for k in m]
            minutes = cell([r["train_s"] for r in done], scale=1 / 60)
            lines.append(f"| {label} | {len(done)} | {max(r['epoch'] for r in done) - 1} | " + " | ".join(cells)
                         + f" | {minutes} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--collect", default=None, metavar="TRIALS_DIR",
                   help="copy the finished trials found there (e.g. runs/tune/trials) into benchmarks/results/")
    args = p.parse_args()
    if args.collect:
        collect(args.collect)
    print(table())


if __name__ == "__main__":
    main()
