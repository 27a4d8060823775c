"""Megatron-LM's cluster habits: ``--exit-signal-handler`` (SIGTERM, as Slurm sends at its
time limit: finish the current step, save, exit 0), ``--exit-duration-in-mins`` and
``--exit-interval``.

Every rank takes the decision together (a MAX all-reduce of the local reasons after each
step), so no rank leaves the collective save or the next step alone.
"""

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist

REASONS = {1: "--exit-interval", 2: "--exit-duration-in-mins", 3: "SIGTERM (--exit-signal-handler)"}


class ExitPolicy:
    def __init__(self, training_cfg, t_start: Optional[float] = None):
        self.cfg = training_cfg
        self.t_start = time.time() if t_start is None else t_start
        self.signalled = False
        self._previous = None
        if training_cfg.exit_signal_handler:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signalled = True  # acted on after the current step

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def check(self, iteration: int) -> Optional[str]:
        """The reason to stop after ``iteration`` (the same on every rank), or None."""
        c, code = self.cfg, 0
        if c.exit_interval and iteration % c.exit_interval == 0:
            code = 1
        if c.exit_duration_in_mins and (time.time() - self.t_start) / 60 >= c.exit_duration_in_mins:
            code = 2
        if self.signalled:
            code = 3
        if dist.is_initialized() and dist.get_world_size() > 1 and (
                c.exit_interval or c.exit_duration_in_mins or c.exit_signal_handler):
            dev = torch.device("cuda", torch.cuda.current_device()) \
                if dist.get_backend() == "nccl" else torch.device("cpu")
            t = torch.tensor([code], dtype=torch.int32, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        return REASONS.get(code)
