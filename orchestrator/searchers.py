"""How a sweep samples its configurations: Tune's search space and search algorithm (`sweep.search`)."""
from __future__ import annotations

from orchestrator.job import Job


def tune_space(job: Job) -> dict:
    from ray import tune
    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {key: make[kind](values) for key, spec in job.sweep.space.items() for kind, values in spec.items()}


def search_algorithm(job: Job):
    """None: Tune's grid + random variant generator (`sweep.search: random`)."""
    return None
