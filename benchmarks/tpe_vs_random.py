"""TPE (`sweep.search: tpe`) against random search (`sweep.search: random`) on the same budget.

    .venv/bin/python benchmarks/tpe_vs_random.py [--repetitions 10] [--trials 30]

In process, no Ray: every trial is the core's `fit` (one epoch, Grafit trained at the coarse level
l0 of generated data, 3 levels) scored like a sweep, by final kNN top-1 at the finest level. Each
method gets `--trials` trials over the same 5-parameter space: Optuna's TPESampler (what Tune's
OptunaSearch runs; its first 10 trials are random) against Optuna's RandomSampler (the same
uniform / log-uniform draws as Tune's random search). A repetition r seeds both samplers and the
training with r, so the two methods of one repetition face the same objective; a configuration
both methods draw is trained once (training is deterministic). The best configuration of each
method is then retrained with `--check-seeds` other seeds, so a win that is one seed's luck shows.
Prints, per repetition and overall, how often and by how much TPE's best beats random's.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from grafit_core.config import config_from_dict, with_overrides  # noqa: E402
from grafit_core.data import load_dataset  # noqa: E402
from grafit_core.engine import fit  # noqa: E402

BASE = {"name": "tpe-vs-random",
        "data": {"name": "synthetic", "train_level": "l0", "augment": "characters", "image_size": 16,
                 "options": {"branching": [4, 4, 4], "per_class": 16, "queries_per_class": 4, "noise": 1.2}},
        "model": {"trunk": "conv4", "width": 16, "embed_dim": 32, "hidden_dim": 64},
        "method": {"name": "grafit"},
        "optim": {"epochs": 1, "batch_size": 32},
        "eval": {"val_size": 100, "k_candidates": [3, 5, 10]}}
# in a job file's sweep.space format; wide ranges, as a first sweep would have them
SPACE = {"optim.base_lr": {"loguniform": [1e-3, 10.0]},
         "method.sigma": {"loguniform": [0.01, 1.0]},
         "optim.weight_decay": {"loguniform": [1e-6, 1e-2]},
         "optim.momentum": {"uniform": [0.0, 0.99]},
         "method.w_inst": {"uniform": [0.0, 2.0]}}
OBJECTIVE = "knn_top1/l2"


def distributions(space: dict) -> dict:
    """sweep.space -> Optuna distributions, as Tune's OptunaSearch converts them."""
    from optuna.distributions import FloatDistribution
    return {key: FloatDistribution(*values, log=(kind == "loguniform"))
            for key, spec in space.items() for kind, values in spec.items()}


class Objective:
    """Final kNN top-1 at the finest level of one-epoch training; each (config, seed) is trained once."""

    def __init__(self, data):
        self.train, self.query = data
        self.cache, self.fits, self.fit_s = {}, 0, 0.0

    def __call__(self, params: dict, seed: int) -> float:
        key = (tuple(sorted(params.items())), seed)
        if key not in self.cache:
            start = time.time()
            cfg = with_overrides(config_from_dict({**BASE, "seed": seed}), params)
            self.cache[key] = fit(cfg, self.train, self.query, log=lambda s: None).metrics[OBJECTIVE]
            self.fits, self.fit_s = self.fits + 1, self.fit_s + time.time() - start
        return self.cache[key]


def search(sampler, objective: Objective, trials: int, seed: int) -> tuple[float, dict]:
    """Optuna's ask/tell loop (what Tune's OptunaSearch does trial by trial); returns the best (value, params)."""
    import optuna
    study = optuna.create_study(direction="maximize", sampler=sampler)
    space = distributions(SPACE)
    for _ in range(trials):
        trial = study.ask(space)
        study.tell(trial, objective(trial.params, seed))
    return study.best_value, study.best_params


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=10,
                        help="independent repetitions (sampler and training seeds 0, 1, ...)")
    parser.add_argument("--trials", type=int, default=30, help="trials per method and repetition (TPE's first 10 "
                                                               "are random)")
    parser.add_argument("--check-seeds", type=int, default=5,
                        help="other training seeds each method's best configuration is retrained with")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: small convolutions gain nothing from more, and a shared "
                             "machine makes more threads spin)")
    args = parser.parse_args()

    import optuna
    import torch
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.time()
    cfg = config_from_dict(BASE)
    objective = Objective(load_dataset(cfg.data.name, cfg.data.root, cfg.data.options))
    print(f"{len(objective.train)} training images (coarse labels l0), {len(objective.query)} queries; "
          f"objective {OBJECTIVE} after 1 epoch; {args.trials} trials per method; space: "
          + ", ".join(f"{k} {kind} {v}" for k, s in SPACE.items() for kind, v in s.items()))
    rows = []
    print(f"\n{'rep':>3}  {'random best':>11}  {'TPE best':>8}  {'TPE - random':>12}   "
          f"{'retrained with ' + str(args.check_seeds) + ' other seeds: random':>44}  {'TPE':>6}  {'TPE - random':>12}")
    for rep in range(args.repetitions):
        best_random, params_random = search(optuna.samplers.RandomSampler(seed=rep), objective, args.trials, rep)
        best_tpe, params_tpe = search(optuna.samplers.TPESampler(seed=rep), objective, args.trials, rep)
        others = [1000 + args.check_seeds * rep + i for i in range(args.check_seeds)]
        again_random = statistics.mean(objective(params_random, s) for s in others)
        again_tpe = statistics.mean(objective(params_tpe, s) for s in others)
        rows.append((best_random, best_tpe, again_random, again_tpe))
        print(f"{rep:>3}  {best_random:>11.4f}  {best_tpe:>8.4f}  {best_tpe - best_random:>+12.4f}   "
              f"{again_random:>44.4f}  {again_tpe:>6.4f}  {again_tpe - again_random:>+12.4f}", flush=True)

    def summary(name, diffs):
        wins, ties = sum(d > 0 for d in diffs), sum(d == 0 for d in diffs)
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        print(f"{name}: TPE better in {wins}/{len(diffs)} repetitions (ties {ties}, worse {len(diffs) - wins - ties}); "
              f"TPE - random: mean {statistics.mean(diffs):+.4f} ± {sd:.4f} (std), "
              f"median {statistics.median(diffs):+.4f}, min {min(diffs):+.4f}, max {max(diffs):+.4f}")

    print()
    summary("best found (the searcher's own seed)", [t - r for r, t, _, _ in rows])
    summary(f"best configuration retrained with {args.check_seeds} other seeds", [t - r for _, _, r, t in rows])
    print(f"mean best: random {statistics.mean(r for r, _, _, _ in rows):.4f}, "
          f"TPE {statistics.mean(t for _, t, _, _ in rows):.4f}")
    print(f"{objective.fits} trainings ({objective.fit_s / max(objective.fits, 1):.2f} s each; configurations both "
          f"methods drew were trained once); wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
