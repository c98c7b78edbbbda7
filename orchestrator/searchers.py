"""How a sweep samples its configurations: Tune's search space and search algorithm (`sweep.search`).

- `random`: Tune's grid + random variant generator; `sweep.seeds: n` adds `seed` as a grid over
  `seed, seed + 1, ..., seed + n - 1` (the job's `seed`), so every sampled configuration is trained n times.
- `tpe`: Optuna's TPE through Tune's `OptunaSearch`, seeded with the job's `seed`, wrapped in Tune's
  `Repeater`: every configuration it suggests is trained `sweep.seeds` times with seeds `seed + i`
  (the replicate index), and TPE is told the mean of the replicates' objective. `num_samples`
  counts configurations. The objective is the final kNN top-1 at the finest test level
  (`job.objective_metric`), reported once, at the end of a trial: the per-epoch reports carry it
  as NaN (Tune refuses a result without the searcher's metric) and TPE never reads them.
"""
from __future__ import annotations

import math

from orchestrator.job import Job


def replicate_seeds(job: Job) -> list[int]:
    """The seeds of one configuration's replicates: the job's seed, then the next ones."""
    return [job.config.seed + i for i in range(job.sweep.seeds)]


def tune_space(job: Job) -> dict:
    from ray import tune
    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    space = {key: make[kind](values) for key, spec in job.sweep.space.items() for kind, values in spec.items()}
    if job.sweep.search == "random" and job.sweep.seeds > 1:
        space["seed"] = tune.grid_search(replicate_seeds(job))   # check_sweep refused `seed` in the space then
    return space


def num_trials(job: Job) -> int:
    """Tune's num_samples: with tpe it counts trials, replicates included (Repeater's rule)."""
    return job.sweep.num_samples * (job.sweep.seeds if job.sweep.search == "tpe" else 1)


def expected_trials(job: Job) -> int:
    """How many trials the whole sweep runs: Tune multiplies num_samples by every grid's length."""
    if job.sweep.search == "tpe":
        return num_trials(job)
    grids = [len(v) for spec in job.sweep.space.values() for kind, v in spec.items() if kind == "grid"]
    return num_trials(job) * math.prod(grids) * (job.sweep.seeds if job.sweep.seeds > 1 else 1)


def search_algorithm(job: Job, objective: str | None = None):
    """None for `random` (Tune's variant generator); for `tpe`, Repeater(OptunaSearch) as described above,
    maximising `objective` (job.objective_metric of the test levels)."""
    if job.sweep.search == "random":          # seeded: a rerun draws the same trials, so they resume
        from ray.tune.search.basic_variant import BasicVariantGenerator
        # a search algorithm passed to Tune ignores TuneConfig's max_concurrent_trials: it limits itself
        return BasicVariantGenerator(random_state=job.config.seed, max_concurrent=job.sweep.max_concurrent)
    if objective is None:
        raise ValueError("search: tpe needs the objective metric (job.objective_metric(levels))")
    # imported here, and the classes defined here: importing Tune's Optuna searcher costs every
    # `grafit` command ~1.4 s (Tune pickles its searcher with cloudpickle, which takes local classes)
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.repeater import TRIAL_INDEX, Repeater

    class FinalOnly(OptunaSearch):
        """TPE learns from a trial's final report only; a configuration with no objective (stopped
        by ASHA, nothing to train) counts as pruned, below every finished one; an error as failed."""

        def on_trial_result(self, trial_id, result):
            pass                                  # per-epoch reports: the objective is NaN there

        def on_trial_complete(self, trial_id, result=None, error=False):
            value = (result or {}).get(self.metric)
            if value is None or math.isnan(value):
                result = None                     # OptunaSearch: no value -> PRUNED, or FAIL with error
            super().on_trial_complete(trial_id, result=result, error=error)

    class Replicates(Repeater):
        """Repeater whose replicate index becomes the trial's `seed` (a config key, so the trial's
        key, run name and MLflow params carry it) instead of Tune's `__trial_index__`."""

        base_seed = job.config.seed

        def suggest(self, trial_id):
            config = super().suggest(trial_id)
            if isinstance(config, dict) and TRIAL_INDEX in config:
                config["seed"] = self.base_seed + config.pop(TRIAL_INDEX)
            return config

    # the space comes from the Tuner's param_space (Tune converts uniform/loguniform/choice for Optuna)
    return Replicates(FinalOnly(metric=objective, mode="max", seed=job.config.seed), repeat=job.sweep.seeds)
