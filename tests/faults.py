"""Fault injection for the tests: a real SIGKILL of one worker process at one step, installed as
the workers' on_step hook (orchestrator.workers.WorkerSpec), never part of the production loop."""
import os
import signal
import sys
from dataclasses import dataclass


@dataclass
class SigkillAt:
    """Rank `rank` kills itself at step `step` of epoch `epoch` (1-based), once: `marker` records it.
    steps_log: a file each rank appends `epoch step rank` to before every step."""
    epoch: int
    step: int
    rank: int
    marker: str
    steps_log: str | None = None

    def __call__(self, epoch: int, step_in_epoch: int, rank: int) -> None:
        if self.steps_log:
            with open(self.steps_log, "a") as f:
                f.write(f"{epoch} {step_in_epoch} {rank}\n")
        if (epoch, step_in_epoch, rank) == (self.epoch, self.step, self.rank) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


def picklable_by_value() -> None:
    """Ray's workers cannot import the tests folder: ship this module's code with the hook."""
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])



@dataclass
class StepLog:
    """Every rank appends `epoch step rank world_size` to `path` before each step; a group of
    `wait_world` workers waits at the start of epoch `wait_epoch` (until Ray restarts it resized)."""
    path: str
    wait_world: int = 0
    wait_epoch: int = 0
    delay_s: float = 0.0                       # rank 0 of a group of 2+ sleeps this long before each step (slow)

    def __call__(self, epoch: int, step_in_epoch: int, rank: int) -> None:
        import time

        import ray.train
        world = ray.train.get_context().get_world_size()
        with open(self.path, "a") as f:
            f.write(f"{epoch} {step_in_epoch} {rank} {world}\n")
        if world == self.wait_world and epoch == self.wait_epoch:
            time.sleep(300)                    # the resize kills this process long before
        if rank == 0 and world > 1:             # the lone survivor need not wait for anything
            time.sleep(self.delay_s)
