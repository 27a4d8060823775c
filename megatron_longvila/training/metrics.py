"""Throughput accounting: model FLOPs of a micro-batch, MFU, and the per-iteration log sinks
(stdout line, JSON-lines metrics file, TensorBoard when installed)."""

import json
import os
from typing import Dict, Optional

import torch

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


def _matmul_params_llm(cfg) -> int:
    """Weights that multiply every token in the language model (no embedding lookup)."""
    h, f, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    kv = cfg.kv_channels * cfg.num_query_groups
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * f  # q, k, v, proj, gate/up/down
    return L * per_layer + h * cfg.vocab_size  # + output layer


def _matmul_params_vision(cfg) -> int:
    h, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    return L * (4 * h * h + 2 * h * f) + cfg.num_channels * cfg.patch_size ** 2 * h


def micro_batch_flops(model_cfg, batch: Dict, trainable) -> float:
    """Model FLOPs (forward + backward) of one micro-batch, as MFU counts them.

    Forward = 2 x matmul weights x tokens + attention (causal within each packed sample).
    Backward = 2x forward for a trained part (activation + weight gradients), 1x forward for a
    frozen part that still passes gradients to a trained part upstream of it, 0 otherwise.
    """
    llm, vis = model_cfg.llm, model_cfg.vision
    cu = batch["cu_seqlens"].long()
    lens = (cu[1:] - cu[:-1]).double()
    tokens = float(batch["tokens"].numel())
    # causal attention: QK^T and AV, each 2*L^2*d/2 flops per layer (half the square)
    attn = 2.0 * float((lens * lens).sum()) * llm.hidden_size * llm.num_layers
    llm_fwd = 2.0 * _matmul_params_llm(llm) * tokens + attn
    n_frames = int(batch["frames"].shape[0]) if batch.get("frames") is not None else 0
    layers_used = model_cfg.vision_layers_used
    p = vis.num_patches
    vis_fwd = n_frames * (2.0 * _matmul_params_vision(vis) * layers_used / max(vis.num_layers, 1) * p
                          + 4.0 * p * p * vis.hidden_size * layers_used)
    proj_fwd = n_frames * 2.0 * p * (4 * vis.hidden_size * llm.hidden_size + llm.hidden_size ** 2)
    t = set(trainable)
    llm_mult = 3.0 if "llm" in t else (2.0 if t & {"vision", "projector"} else 1.0)
    proj_mult = 3.0 if "projector" in t else (2.0 if "vision" in t else 1.0)
    vis_mult = 3.0 if "vision" in t else 1.0
    return llm_fwd * llm_mult + proj_fwd * proj_mult + vis_fwd * vis_mult


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
