"""Fault injection for the tests, in one place (the hidden ``--debug-*`` flags of the trainer,
:class:`~megatron_longvila.config.DebugConfig`): SIGKILL after an iteration, SIGKILL in the
middle of a checkpoint save, a NaN loss at an iteration. Nothing here runs unless a test asks.
"""

import os
import signal
import sys
from typing import Callable, Optional


def _print_rank0(msg):
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def nan_loss_hook(nan_at_iteration: Optional[int], iteration: int) -> Optional[Callable]:
    """A ``loss_hook`` for :func:`~megatron_longvila.training.step.train_step` that turns the
    per-token losses of iteration ``nan_at_iteration`` (1-based) into NaN; None otherwise."""
    if nan_at_iteration is None or iteration != nan_at_iteration:
        return None
    return lambda losses: losses * float("nan")


def kill_after_iteration(kill_at: Optional[int], iteration: int):
    """SIGKILL this process once ``iteration`` is done, if it is ``kill_at``."""
    if kill_at is not None and kill_at == iteration:
        _print_rank0(f"[test] SIGKILL after iteration {iteration}")
        os.kill(os.getpid(), signal.SIGKILL)


def kill_during_save(kill_at: Optional[int], iteration: int) -> Optional[Callable[[str], None]]:
    """If ``iteration`` is ``kill_at``: a ``before_commit`` hook for the save of this iteration
    that SIGKILLs this process once the checkpoint's files are written but before it is renamed
    into place and named by the tracker; None otherwise."""
    if kill_at is None or kill_at != iteration:
        return None

    def killer(path):
        print(f"[test] SIGKILL during the save into {path}", flush=True)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    return killer
