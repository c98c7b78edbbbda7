"""`make test` runs two pytest-xdist workers (`-n 2`). The modules that start Ray (a local Ray, a
2-node cluster, Tune sweeps) are one unit of work, run in their order on one worker: never two Rays at
once on 2 cores, and a module's cluster fixture is built once. Those tests wait a lot (process start-up
on one core, node deaths, servers): the other worker runs the plain tests in that idle time only
(SCHED_IDLE: Ray's own workers run at nice 15, which nice 19 would still take ~30% from).
"""
import os

import pytest

RAY_MODULES = {"test_cluster", "test_elastic", "test_finetune", "test_matrix", "test_ray_train", "test_reliability",
               "test_search", "test_sweep", "test_sweep_resume", "test_ui"}


def starts_ray(nodeid: str) -> bool:
    return os.path.basename(nodeid.split("::")[0]).removesuffix(".py") in RAY_MODULES


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    # xdist's own loadgroup marks tests by rewriting their node ids, which pytest 9.2 no longer reads
    from xdist.scheduler import LoadScopeScheduling

    class RayTestsTogether(LoadScopeScheduling):
        """Units of work: all Ray tests (the largest unit, so the first a worker gets), each other test."""
        def _split_scope(self, nodeid: str) -> str:
            return "ray" if starts_ray(nodeid) else nodeid

    return RayTestsTogether(config, log)


def pytest_runtest_setup(item):
    # a worker that runs a plain test never runs a Ray test afterwards (the Ray unit comes first); the
    # policy is per thread on Linux: every thread of this worker, and children and new threads inherit it
    if os.environ.get("PYTEST_XDIST_WORKER") and not starts_ray(item.nodeid):
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
            except (ProcessLookupError, PermissionError):
                pass
