"""How the training processes end: SIGTERM (cluster preemption) polled between updates, DataLoader
workers that leave it to the main process, and a clean exit of the process group."""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing.util
import signal

import torch

logger = logging.getLogger(__name__)


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to the main process. Clusters (SLURM, Kubernetes) signal every
    process of a job; a worker that died of it would crash the main process before it saved anything.
    The workers still end with the main process (its shutdown, or their watch on its pid)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register  # after multiprocessing.util's exit function (imported above), so it runs first
def _end_loader_workers() -> None:
    """At exit multiprocessing sends its daemonic children (loader workers) SIGTERM and waits for them.
    Workers that ignore SIGTERM would keep it waiting forever when a crash left their loader open."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each as a worker failure
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def end_processes(accelerator) -> None:
    """Closes the trackers and destroys the process group. Call it after dropping the script's own
    reference to the prepared (DDP-wrapped) model.

    A DDP wrapper freed after the process group is the group's last owner: its destructor then
    joins gloo's worker threads while holding the GIL, and a worker that needs the GIL to free a
    tensor of the last collective never finishes (torch 2.13: about 1 exit in 10 hung in
    two-process CPU runs on a loaded machine). Freed first, the group dies in
    destroy_process_group, which lets go of the GIL.
    """
    accelerator.free_memory()  # the accelerator's own references to the wrapped model
    gc.collect()
    if any(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects()):
        logger.warning(
            "a DistributedDataParallel model outlives the process group: its exit may hang (drop every reference before end_processes)"
        )
    accelerator.end_training()


class StopSignal:
    """Turns SIGTERM (cluster preemption) into a flag the training loop polls between steps."""

    def __init__(self):
        self.received = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def release(self) -> None:
        """SIGTERM ends the process again, once the results are saved: a launcher stopping a stuck exit must be able to."""
        signal.signal(signal.SIGTERM, self.previous)

    def agreed(self, accelerator) -> bool:
        """True on every process if any process got the signal, so all of them save together."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
