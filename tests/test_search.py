"""sweep.search: tpe (Optuna's TPE through Tune's OptunaSearch) and sweep.seeds (replicates through
Tune's Repeater): what is refused before Ray starts, what the searcher suggests and is told, and one
real Tune sweep read back from MLflow."""
import math

import pytest
import yaml

from grafit_core.errors import ConfigError
from orchestrator.cli import main as grafit
from orchestrator.job import load_job
from orchestrator.searchers import num_trials, search_algorithm, tune_space
from tiny import tiny_job

BASE = tiny_job("search-test", epochs=1)
SIGMA = {"method.sigma": {"loguniform": [0.02, 0.5]}}
OBJECTIVE = "knn_top1/l2"


def write(tmp_path, sweep, seed=0):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**BASE, "seed": seed, "sweep": sweep}))
    return str(path)


@pytest.mark.parametrize("sweep,key,says", [
    ({"search": "tpe", "space": {"method.sigma": {"grid": [0.05, 0.1]}}}, "sweep.space.method.sigma.grid", "choice"),
    ({"search": "tpe", "space": {**SIGMA, "seed": {"choice": [0, 1]}}}, "sweep.space.seed", "sweep.seeds"),
    ({"search": "tpe", "space": {}}, "sweep.space", "at least one"),
    ({"search": "tpe", "space": {"data.options": {"choice": [{"per_class": 6}, {"per_class": 4}]}}},
     "sweep.space.data.options.choice", "str"),
    ({"space": {"seed": {"grid": [0, 1]}}, "seeds": 2, "scheduler": "fifo"}, "sweep.space.seed", "sweep.seeds"),
    ({"search": "tpe", "space": SIGMA, "seeds": 2}, "sweep.seeds", "fifo"),         # ASHA is the default
    ({"space": SIGMA, "seeds": 3, "scheduler": "asha"}, "sweep.seeds", "fifo"),
    ({"search": "tpe", "space": SIGMA, "seeds": 0}, "sweep.seeds", ">= 1"),
    ({"search": "optuna"}, "sweep.search", "tpe"),
])
def test_search_errors_name_the_key(tmp_path, sweep, key, says):
    path = write(tmp_path, sweep)
    with pytest.raises(ConfigError) as err:
        load_job(path)
    assert str(err.value).startswith(f"{path}: {key}:"), str(err.value)
    assert says in str(err.value).split(f"{key}:", 1)[1], str(err.value)


def test_grid_with_tpe_is_refused_before_ray(tmp_path, capsys):
    path = write(tmp_path, {"search": "tpe", "space": {"method.sigma": {"grid": [0.05, 0.1]}}, "scheduler": "fifo"})
    assert grafit(["sweep", path, "--storage-path", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.startswith(f"grafit: error: {path}: sweep.space.method.sigma.grid: search: tpe")
    assert not (tmp_path / "runs").exists()


def test_random_search_replicates_are_a_grid_over_seeds(tmp_path):
    job = load_job(write(tmp_path, {"space": SIGMA, "seeds": 3, "num_samples": 2, "scheduler": "fifo"}, seed=5))
    assert tune_space(job)["seed"] == {"grid_search": [5, 6, 7]}
    assert num_trials(job) == 2                        # Tune repeats the 3-seed grid twice: 6 trials
    from ray.tune.search.basic_variant import BasicVariantGenerator
    alg = search_algorithm(job, OBJECTIVE)                # seeded (a rerun draws the same trials), concurrency kept
    assert isinstance(alg, BasicVariantGenerator) and alg.max_concurrent == job.sweep.max_concurrent
    draws = [BasicVariantGenerator(random_state=5)._random_state.uniform(size=3) for _ in range(2)]
    assert (alg._random_state.uniform(size=3) == draws[0]).all() and (draws[0] == draws[1]).all()
    assert "seed" not in tune_space(load_job(write(tmp_path, {"space": SIGMA})))


def suggest_all(job, n):
    alg = search_algorithm(job, OBJECTIVE)
    alg.set_search_properties(None, None, tune_space(job))   # what Tune does with the Tuner's param_space
    return alg, [alg.suggest(f"t{i}") for i in range(n)]


def test_tpe_trains_each_configuration_once_per_seed_and_learns_their_mean(tmp_path):
    job = load_job(write(tmp_path, {"search": "tpe", "seeds": 3, "num_samples": 2, "scheduler": "fifo",
                                    "space": {**SIGMA, "model.projector": {"choice": ["mlp", "linear"]}}}, seed=4))
    assert num_trials(job) == 6
    alg, configs = suggest_all(job, 6)
    assert [c["seed"] for c in configs] == [4, 5, 6, 4, 5, 6]            # the job's seed + replicate index
    assert all(set(c) == {"method.sigma", "model.projector", "seed"} for c in configs)   # no __trial_index__
    strip = [{k: v for k, v in c.items() if k != "seed"} for c in configs]
    assert strip[0] == strip[1] == strip[2] and strip[3] == strip[4] == strip[5] and strip[0] != strip[3]
    assert 0.02 <= configs[0]["method.sigma"] <= 0.5 and configs[0]["model.projector"] in ("mlp", "linear")

    # Tune's per-epoch results carry the objective as NaN: TPE must not see them
    alg.on_trial_result("t0", {OBJECTIVE: math.nan, "training_iteration": 1})
    for trial, value in (("t0", 0.5), ("t1", 0.6), ("t2", math.nan)):     # t2: a replicate without a value
        alg.on_trial_complete(trial, result={OBJECTIVE: value})
    with pytest.warns(RuntimeWarning, match="Mean of empty slice"):      # Repeater's nanmean of no value
        for trial in ("t3", "t4", "t5"):                                    # e.g. stopped, nothing to report
            alg.on_trial_complete(trial, result={"epoch": 1})
    study = alg.searcher._ot_study
    import optuna
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.COMPLETE and first.value == pytest.approx(0.55)   # mean of 0.5, 0.6
    assert first.intermediate_values == {}
    assert first.params == strip[0]
    assert second.state == optuna.trial.TrialState.PRUNED                  # ranked below every finished one


def test_tpe_is_seeded_by_the_job(tmp_path):
    sweep = {"search": "tpe", "num_samples": 3, "scheduler": "fifo", "space": SIGMA}
    first = suggest_all(load_job(write(tmp_path, sweep, seed=0)), 3)[1]
    again = suggest_all(load_job(write(tmp_path, sweep, seed=0)), 3)[1]
    other = suggest_all(load_job(write(tmp_path, sweep, seed=1)), 3)[1]
    assert first == again
    assert [c["method.sigma"] for c in first] != [c["method.sigma"] for c in other]
    assert [c["seed"] for c in first] == [0, 0, 0] and [c["seed"] for c in other] == [1, 1, 1]


@pytest.mark.timeout(600)
def test_tpe_sweep_with_replicates_tracked_in_mlflow(tmp_path, monkeypatch):
    """2 TPE configurations x 2 seeds: 4 trainings, 4 child runs, TPE told each configuration's mean."""
    import optuna
    import ray
    from mlflow.tracking import MlflowClient
    from orchestrator import sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    made = []
    monkeypatch.setattr(sweep, "search_algorithm", lambda *a: made.append(search_algorithm(*a)) or made[-1])
    path = write(tmp_path, {"search": "tpe", "seeds": 2, "num_samples": 2, "scheduler": "fifo",
                            "space": {"method.sigma": {"loguniform": [0.03, 0.3]},
                                      "method.tau_base": {"uniform": [0.9, 0.999]}}})
    try:
        assert grafit(["sweep", path, "--storage-path", str(tmp_path / "runs"), "--num-cpus", "2"]) == 0
    finally:
        ray.shutdown()

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("search-test")
    runs = c.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.data.tags.get("grafit.kind") != "aggregate"]     # part 2 of issue 15 adds aggregate runs
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    groups = {}
    for run in children:
        groups.setdefault((run.data.params["method.sigma"], run.data.params["method.tau_base"]), []).append(run)
    assert len(groups) == 2                                                # num_samples counts configurations
    assert all(sorted(r.data.params["seed"] for r in members) == ["0", "1"] for members in groups.values())
    assert parent.data.tags["best.run_id"] in {r.info.run_id for r in runs}

    # TPE was told, once per configuration, the mean of its replicates' final objective
    study = made[0].searcher._ot_study
    told = sorted((t.params["method.sigma"], t.params["method.tau_base"], t.value) for t in study.trials)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    means = sorted((float(s), float(tau), sum(r.data.metrics[OBJECTIVE] for r in members) / len(members))
                   for (s, tau), members in groups.items())
    assert len(told) == 2
    for (s, tau, value), (ms, mtau, mean) in zip(told, means):
        assert s == pytest.approx(ms) and tau == pytest.approx(mtau) and value == pytest.approx(mean, abs=1e-9)


def test_tpe_vs_random_benchmark_at_a_tiny_size():
    """The benchmark's arithmetic at 11 trials: TPE's first 10 trials are the random sampler's own draws
    (trained once), so 11 + 1 trainings, plus one retraining of each method's best."""
    import os
    import re
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "tpe_vs_random.py"), "--repetitions", "1",
                        "--trials", "11", "--check-seeds", "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    row = next(line.split() for line in p.stdout.splitlines() if line.startswith("  0 "))
    rand, tpe, diff, again_rand, again_tpe, again_diff = map(float, row[1:])
    assert 0 < rand <= 1 and 0 < tpe <= 1 and diff == pytest.approx(tpe - rand, abs=2e-4)   # printed to 4 decimals
    assert again_diff == pytest.approx(again_tpe - again_rand, abs=2e-4)   # printed to 4 decimals
    fits = int(re.search(r"(\d+) trainings", p.stdout).group(1))
    assert fits in (13, 14), p.stdout                 # 14, or 13 when both bests are one configuration
