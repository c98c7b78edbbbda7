"""Issue 9's Table 6-style block: pre-train on alphabets, fine-tune on characters (FC / MLP head).

    .venv/bin/python benchmarks/finetune_table6.py [--spec jobs/finetune/table6.yaml] [--summary]

Each pre-training (method, seed) is trained once with `grafit_core.engine.fit` and checkpointed
under runs/table6/; each (method, seed, head) fine-tuning cell is appended to the results JSON
as soon as it ends, so a stopped run resumes. Prints character top-1 / top-5, mean ± std.
"""
import argparse
import json
import os
import statistics
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from grafit_core.config import load_config, with_overrides  # noqa: E402
from grafit_core.engine import fit  # noqa: E402
from grafit_core.finetune import finetune  # noqa: E402
from reproduce_table5 import cached_data, save  # noqa: E402


def pretrained(spec, label, job, seed, here, data_cache):
    """The checkpoint dir of (label, seed), trained now if it is not there yet (None: random trunk)."""
    if job is None:
        return None
    out = os.path.join(ROOT, "runs", "table6", f"{label.replace(' ', '_').replace('+', 'plus')}-{seed}")
    if not os.path.exists(os.path.join(out, "train_state.pt")):
        cfg = load_config(os.path.join(here, "..", "table5", job), {**spec["pretrain_budget"], "seed": seed})
        train, query = cached_data(cfg, data_cache)
        last = cfg.optim.epochs
        fit(cfg, train, query, on_epoch=lambda e, s, save_to: save_to(out) if e == last else None,
            log=lambda s: print("   ", s, flush=True))
    return out


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=os.path.join(ROOT, "jobs", "finetune", "table6.yaml"),
                        help="methods, heads, seeds and the fixed budgets")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "table6_omniglot.json"),
                        help="results JSON; cells already in it are not run again")
    parser.add_argument("--summary", action="store_true", help="print the table from the JSON, train nothing")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    parser.add_argument("--only", action="append", metavar="LABEL",
                        help="run only this pre-training label (repeatable); two runs with disjoint "
                             "labels can share the results file")
    args = parser.parse_args(argv)
    spec = yaml.safe_load(open(args.spec))
    here = os.path.dirname(os.path.abspath(args.spec))
    results = json.load(open(args.output)) if os.path.exists(args.output) else {}
    cache: dict = {}
    unknown = set(args.only or ()) - set(spec["pretrained"])
    if unknown:
        parser.error(f"--only {sorted(unknown)}: not a label of {args.spec} ({list(spec['pretrained'])})")
    todo = {k: v for k, v in spec["pretrained"].items() if args.only is None or k in args.only}
    for label, job in ([] if args.summary else todo.items()):
        for seed in spec["seeds"]:
            for head in spec["heads"]:
                key = f"{label}/{head}/{seed}"
                if key in results:
                    continue
                print(f"== {key}", flush=True)
                ckpt = pretrained(spec, label, job, seed, here, cache)
                base = load_config(os.path.join(here, "omniglot.yaml"), {**spec["pretrain_budget"], "seed": seed})
                cfg = with_overrides(base, {**spec["finetune"], "finetune.head": head, "finetune.checkpoint": ckpt})
                train, test = cached_data(cfg, cache)
                res = finetune(cfg, train, test, log=lambda s: print("   ", s, flush=True))
                results[key] = {"metrics": res.metrics, "history": res.history}
                save(args.output, results)
    level = spec["finetune"]["finetune.level"]
    header = ["pre-training", "head", "seeds", "top-1 %", "top-5 %"]
    rows = []
    for label in spec["pretrained"]:
        for head in spec["heads"]:
            runs = [v["metrics"] for k, v in results.items() if k.rsplit("/", 2)[:2] == [label, head]]
            if not runs:
                continue
            cells = []
            for metric in ("top1", "top5"):
                vals = [100 * r[f"finetune_{metric}/{level}"] for r in runs]
                sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
                cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}")
            rows.append([label, head.upper(), str(len(runs)), *cells])
    if args.markdown:
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        print("\n".join("| " + " | ".join(r) + " |" for r in rows))
    else:
        print(f"{header[0]:14s} {header[1]:5s} {header[2]:5s} {header[3]:>12s} {header[4]:>12s}")
        for r in rows:
            print(f"{r[0]:14s} {r[1]:5s} {r[2]:5s} {r[3]:>12s} {r[4]:>12s}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
