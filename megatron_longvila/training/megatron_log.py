"""Megatron-LM's log line and TensorBoard / Weights & Biases tag names (as in Megatron-LM's
``training_log``), so users' log parsers and dashboards keep working; the torch profiler of
``--profile``.

Tags: ``lm loss``, ``learning-rate``, ``batch-size``, ``loss-scale``, ``grad-norm``,
``params-norm``, ``world-size``, ``iteration-time``, ``throughput`` (each but the last two also
``<tag> vs samples``), ``validation lm loss``; the JSON-lines metrics file keeps its own keys.
"""

import datetime
import os
from typing import Any, Dict, Optional

import torch

# metrics-file key -> Megatron-LM tag (the value of the record is logged as it is)
TAGS = {"loss": "lm loss", "lr": "learning-rate", "global_batch_size": "batch-size",
        "loss_scale": "loss-scale", "grad_norm": "grad-norm", "params_norm": "params-norm",
        "world_size": "world-size"}
TIMER_TAGS = {"iteration_time_s": "iteration-time", "throughput": "throughput"}


def megatron_log_line(rec: Dict[str, Any], train_iters: int, log_throughput: bool,
                      timing_log_level: int = 0) -> str:
    """Megatron-LM's stdout line for one iteration's record (our extras after it)."""
    s = f" [{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f')}]"
    s += f" iteration {rec['iteration']:8d}/{train_iters:8d} |"
    s += f" consumed samples: {rec['consumed_samples']:12d} |"
    s += f" elapsed time per iteration (ms): {rec['iteration_time_s'] * 1000.0:.1f} |"
    if log_throughput:
        s += f" throughput per GPU (TFLOP/s/GPU): {rec['throughput']:.1f} |"
    s += f" learning rate: {rec['lr']:.6E} |"
    s += f" global batch size: {rec['global_batch_size']:5d} |"
    s += f" lm loss: {rec['loss']:.6E} |"
    s += f" loss scale: {rec['loss_scale']:.1f} |"
    if rec.get("grad_norm") is not None:
        s += f" grad norm: {rec['grad_norm']:.3f} |"
    if rec.get("params_norm") is not None:
        s += f" params norm: {rec['params_norm']:.3f} |"
    s += f" number of skipped iterations: {rec['skipped_this_iteration']:3d} |"
    s += f" number of nan iterations: {rec['nan_this_iteration']:3d} |"
    s += f" tokens per second: {rec['tokens_per_s']:.0f} |"
    if "mfu" in rec:
        s += f" MFU: {100 * rec['mfu']:.1f}% |"
    if timing_log_level > 0:
        for k in ("forward-backward", "optimizer"):
            if f"time_{k}_ms" in rec:
                s += f" {k} (ms): {rec[f'time_{k}_ms']:.1f} |"
    return s


class MegatronScalarWriter:
    """Rank 0's TensorBoard and W&B scalars under Megatron-LM's tag names."""

    def __init__(self, cfg, rank: int):
        lg = cfg.logging
        self.interval = lg.tensorboard_log_interval
        self.log_timers = True
        self.tb = self.wandb = None
        if rank != 0:
            return
        if lg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # needs tensorboard (checked)
            self.tb = SummaryWriter(log_dir=lg.tensorboard_dir, max_queue=1000)
        if lg.wandb_project:
            import wandb  # optional, checked at start-up
            save_dir = lg.wandb_save_dir or (os.path.join(cfg.checkpoint.save, "wandb")
                                             if cfg.checkpoint.save else os.path.abspath("wandb"))
            os.makedirs(save_dir, exist_ok=True)
            self.wandb = wandb.init(project=lg.wandb_project, name=lg.wandb_exp_name,
                                    dir=save_dir, config=cfg.to_dict())

    def write(self, rec: Dict[str, Any]):
        it = rec["iteration"]
        if not (self.tb or self.wandb) or it % self.interval:
            return
        vals = {}
        for key, tag in {**TAGS, **TIMER_TAGS}.items():
            v = rec.get(key)
            if isinstance(v, (int, float)) and v == v:
                vals[tag] = float(v)
        if self.tb:
            samples = rec["consumed_samples"]
            for tag, v in vals.items():
                self.tb.add_scalar(tag, v, it)
                if tag not in TIMER_TAGS.values():
                    self.tb.add_scalar(f"{tag} vs samples", v, samples)
        if self.wandb:
            self.wandb.log({**vals, "samples vs steps": rec["consumed_samples"]}, step=it)

    def write_validation(self, iteration: int, loss: float, samples: int):
        if self.tb:
            self.tb.add_scalar("validation lm loss", loss, iteration)
            self.tb.add_scalar("validation lm loss vs samples", loss, samples)
        if self.wandb:
            self.wandb.log({"validation lm loss": loss}, step=iteration)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class Profiler:
    """``--profile``: the torch profiler over iterations [start, end), a Chrome/TensorBoard trace
    per rank in ``profile_dir``."""

    def __init__(self, lg, rank: int):
        self.prof = None
        self.lg = lg
        self.rank = rank

    def before(self, iteration: int):  # iteration: the one about to run (1-based)
        lg = self.lg
        if lg.profile and iteration == lg.profile_step_start and self.prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=True)
            self.prof.__enter__()

    def after(self, iteration: int) -> Optional[str]:
        if self.prof is not None and iteration + 1 >= self.lg.profile_step_end:
            return self.stop(iteration)
        return None

    def stop(self, iteration: int) -> Optional[str]:
        if self.prof is None:
            return None
        self.prof.__exit__(None, None, None)
        os.makedirs(self.lg.profile_dir, exist_ok=True)
        path = os.path.join(self.lg.profile_dir,
                            f"trace_rank{self.rank}_iters{self.lg.profile_step_start}-"
                            f"{iteration}.json")
        self.prof.export_chrome_trace(path)
        self.prof = None
        return path


def params_norm(model) -> float:
    """L2 norm of the parameters (every rank's own; tensor-parallel shards summed over TP)."""
    from megatron.core import parallel_state
    import torch.distributed as dist
    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if getattr(p, "tensor_model_parallel", False) or \
                parallel_state.get_tensor_model_parallel_rank() == 0:
            sq += p.detach().double().pow(2).sum().cpu()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        dev = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend() == "nccl" else torch.device("cpu")
        t = sq.to(dev)
        dist.all_reduce(t, group=parallel_state.get_tensor_model_parallel_group())
        sq = t.cpu()
    return float(sq.sqrt())
