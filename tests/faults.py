"""Fault injection for the tests: a real SIGKILL of one worker process at one step, installed as
the workers' on_step hook (orchestrator.workers.WorkerSpec), never part of the production loop."""
import os
import signal
import sys
from dataclasses import dataclass


@dataclass
class SigkillAt:
    """Rank `rank` kills itself at step `step` of epoch `epoch` (1-based), once: `marker` records it."""
    epoch: int
    step: int
    rank: int
    marker: str

    def __call__(self, epoch: int, step_in_epoch: int, rank: int) -> None:
        if (epoch, step_in_epoch, rank) == (self.epoch, self.step, self.rank) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


def picklable_by_value() -> None:
    """Ray's workers cannot import the tests folder: ship this module's code with the hook."""
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
