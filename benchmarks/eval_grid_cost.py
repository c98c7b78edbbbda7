"""Cost of a sweep over 5 values of k (evaluation-only) relative to one trial.

    .venv/bin/python benchmarks/eval_grid_cost.py [--config jobs/sweeps/omniglot_sigma_tau.yaml]

k never retrains: a trial trains once and evaluates every k from the same embeddings. This
trains one trial, then times its evaluation without and with the 5-value grid on the same
embeddings, and prints (training + evaluation with the grid) / (training + one evaluation).
Goal <= 1.1. A sweep that retrained per k would cost 5.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grafit_core.config import with_overrides  # noqa: E402
from orchestrator.job import load_job  # noqa: E402
from grafit_core.data import prepare_data  # noqa: E402
from grafit_core.engine import embed, fit  # noqa: E402
from grafit_core.evaluate import check_against_data, evaluate  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "jobs", "sweeps", "omniglot_sigma_tau.yaml"),
                        help="a sweep file with an eval_grid over eval.k")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. optim.epochs=2")
    args = parser.parse_args()
    import yaml
    job = load_job(args.config, {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)})
    cfg = job.config
    grid = job.sweep.eval_grid
    base = with_overrides(cfg, {"eval.grid": {}})
    train, query = prepare_data(cfg.data)
    levels = check_against_data(cfg, train)

    start = time.time()
    res = fit(base, train, query, log=lambda s: None)
    trial_s = time.time() - start
    from grafit_core.data.transforms import build_transform
    channels = train.image(0).shape[0]
    tf = build_transform(cfg.data.augment, cfg.data.image_size, channels, train=False)
    bank, _ = embed(res.method, train, cfg, res_ctx(), tf)
    queries, logits = embed(res.method, query, cfg, res_ctx(), tf)

    start = time.time()
    evaluate(base, bank, 0, train, queries, query, levels, query_logits=logits)
    one_s = time.time() - start
    start = time.time()
    metrics = evaluate(cfg, bank, 0, train, queries, query, levels, query_logits=logits)
    grid_s = time.time() - start
    n_variants = len([k for k in metrics if k.startswith(f"knn_top1/{levels[-1]}")])
    print(f"{cfg.name}: one trial = {trial_s:.1f} s (training + one evaluation of {one_s:.1f} s)")
    print(f"evaluation of the grid {grid} ({n_variants} metric sets incl. the base): {grid_s:.1f} s")
    print(f"sweep over {len(next(iter(grid.values())))} values of k / one trial = "
          f"{(trial_s - one_s + grid_s) / trial_s:.3f}   (goal <= 1.1; retraining per k would be "
          f"{len(next(iter(grid.values())))}.0)")


def res_ctx():
    from grafit_core.distributed import DistContext
    return DistContext()


if __name__ == "__main__":
    main()
