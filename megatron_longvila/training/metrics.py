"""Throughput accounting: model FLOPs of a micro-batch, MFU, and the per-iteration log sinks
(stdout line, JSON-lines metrics file, TensorBoard when installed)."""

import json
import os
from typing import Dict, Optional

import torch

from ..constants import IGNORE_INDEX
from .flops import step_flops

# Dense bf16 peak per GPU (TFLOP/s), by substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "B200": 2250.0, "GB200": 2500.0}


def device_peak_tflops(override: Optional[float] = None) -> Optional[float]:
    if override:
        return float(override)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, val in PEAK_TFLOPS.items():
        if key in name:
            return val
    return None


def micro_batch_flops(model_cfg, batch: Dict, trainable) -> float:
    """Model FLOPs (forward + backward) of one micro-batch: :func:`flops.step_flops` on its
    packed samples, its frames and its labelled positions."""
    cu = batch["cu_seqlens"].long().tolist()
    lens = [e - s for s, e in zip(cu[:-1], cu[1:])]
    frames = batch.get("frames")
    n_frames = int(frames.shape[0]) if frames is not None else 0
    labelled = int((batch["labels"] != IGNORE_INDEX).sum())
    return step_flops(model_cfg, lens, n_frames, labelled_tokens=labelled,
                      trainable=trainable)["total"]


class MetricsWriter:
    """Rank 0's per-iteration records: JSON lines (flushed each line) and TensorBoard."""

    def __init__(self, metrics_file: Optional[str], tensorboard_dir: Optional[str], rank: int):
        self.rank = rank
        self.f = None
        self.tb = None
        if rank != 0:
            return
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self.f = open(metrics_file, "a")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=tensorboard_dir)
            except Exception as e:  # noqa: BLE001 - tensorboard is optional
                print(f"[warning] --tensorboard-dir ignored: {e} (pip install tensorboard)",
                      flush=True)

    def write(self, record: Dict):
        if self.rank != 0:
            return
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
        if self.tb:
            step = record.get("iteration", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(k, v, step)

    def close(self):
        if self.f:
            self.f.close()
        if self.tb:
            self.tb.close()
