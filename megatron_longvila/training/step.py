"""One training step: :func:`train_step` is the only caller of Megatron-Core's forward-backward
schedule (the trainer's loop, its evaluation, the benchmarks and the tests all come here).

A step runs the global batch's micro-batches (gradient accumulation) through
``get_forward_backward_func()``. Every micro-batch's loss is the *sum* of its token losses
(``calculate_per_token_loss``); :func:`train_step` counts the valid label tokens of the whole
global batch (all-reduced over data-parallel ranks; the ranks of one TP/SP group see the same
rows) and hands that count explicitly to the gradient finalisation, which divides the summed
gradients by it. The result equals the single-process gradient of the mean token loss of the
global batch at every TP x SP x DP layout.
"""

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from ..constants import IGNORE_INDEX
from .metrics import micro_batch_flops

BATCH_KEYS = ("tokens", "labels", "position_ids", "cu_seqlens", "frames", "frames_per_sample")


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


class BatchFeed:
    """The data iterator handed to Megatron's schedule: moves each micro-batch to the device
    and counts what it held (samples, tokens, valid label tokens, model FLOPs, sample keys)."""

    def __init__(self, batches: Iterator[dict], arch, trainable):
        self.batches, self.arch, self.trainable = batches, arch, tuple(trainable)
        self.reset()

    def reset(self):
        self.samples = self.tokens = self.label_tokens = 0
        self.flops = 0.0
        self.keys: List[str] = []

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.batches)
        self.samples += int(b["num_samples"])
        self.tokens += int(b["tokens"].numel())
        self.label_tokens += int((b["labels"] != IGNORE_INDEX).sum())
        self.flops += micro_batch_flops(self.arch, b, self.trainable)
        self.keys.extend(b.get("sample_keys", []))
        dev = device()
        return {k: b[k].to(dev, non_blocking=True) for k in BATCH_KEYS}


@dataclass
class StepResult:
    """What one step did: the global batch's mean token loss, its valid label tokens, the
    gradient norm (NaN when no update), whether the update was skipped (and why)."""
    loss: float
    label_tokens: int
    grad_norm: Optional[float]  # NaN when the update was skipped; None if not computed
    skipped: Optional[str] = None  # None, "nan" (NaN/Inf loss or gradient), "loss-scale" (fp16)
    lr: float = float("nan")
    samples: int = 0  # over data-parallel ranks
    tokens: int = 0
    flops: float = 0.0
    sample_keys: List[str] = field(default_factory=list)  # this DP rank's


def make_forward_step(dtype: torch.dtype, loss_hook: Optional[Callable] = None):
    """Megatron's ``forward_step(data_iterator, model) -> (output, loss_func)``: per-token losses
    of one micro-batch, and a loss function returning (loss sum, valid tokens, report)."""

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        frames = b["frames"].to(dtype) if dtype != torch.float32 else b["frames"]
        out = model(b["tokens"], b["position_ids"], frames, b["labels"], b["cu_seqlens"],
                    b["frames_per_sample"])
        losses = out.output  # this rank's rows (its MM-SP shard at SP > 1)
        mask = out.loss_mask.to(losses.dtype)
        if loss_hook is not None:
            losses = loss_hook(losses)
        return losses, functools.partial(_loss_func, mask)

    return forward_step


def _loss_func(mask, output):
    total = (output.float() * mask).sum()
    count = mask.sum()
    return total, count.to(torch.int), {"lm loss": torch.stack([total.detach(),
                                                               count.detach().float()])}


def _finalize_with(global_tokens: int, model, num_tokens=None, **kwargs):
    """Megatron's gradient finalisation (DP x SP all-reduce) with the gradients divided by the
    global valid-token count counted by :func:`train_step`. The schedule's own count (the
    local shards' loss masks) must add up to the same number: a check, not an input."""
    finalize_model_grads(model, None, **kwargs)
    if num_tokens is not None:
        n = num_tokens.clone()
        dist.all_reduce(n, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        if int(n) != global_tokens:
            raise RuntimeError(f"loss masks hold {int(n)} label tokens, the batches "
                               f"{global_tokens}: the sequence-parallel shards lost labels")
    if global_tokens > 0:
        scale = 1.0 / torch.tensor(global_tokens, dtype=torch.int, device=device())
        for chunk in model:
            chunk.scale_gradients(scale)


def _sum_dp(values: List[float]) -> List[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t.tolist()


def _mean_loss(reports) -> Dict[str, float]:
    """Sum of (loss sum, token count) over micro-batches and the DP x SP group."""
    tot = torch.zeros(2, dtype=torch.float64, device=device())
    for r in reports:
        tot += r["lm loss"].to(torch.float64).to(tot.device)
    dist.all_reduce(tot, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return {"loss": float(tot[0] / tot[1].clamp(min=1)) if reports else float("nan"),
            "tokens": int(tot[1])}


def _grads_finite(model) -> bool:
    ok = all(torch.isfinite(p.main_grad).all() for p in model.module.parameters()
             if getattr(p, "main_grad", None) is not None)
    flag = torch.tensor([1.0 if ok else 0.0], device=device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def train_step(model, optimizer, scheduler, feed: BatchFeed, num_micro_batches: int,
               seq_length: int, global_batch_size: int, dtype: torch.dtype,
               loss_hook: Optional[Callable] = None) -> StepResult:
    """One optimizer step on ``num_micro_batches`` micro-batches from ``feed``.

    ``model``: Megatron-Core DDP of the model (built by ``training.train.build_model``);
    ``optimizer`` / ``scheduler``: Megatron-Core's (``build_optimizer``); ``seq_length``: the
    tokens of one micro-batch's packed row(s); ``global_batch_size``: samples the scheduler
    advances by; ``loss_hook``: test fault injection on the per-token losses. A NaN/Inf loss or
    gradient skips the update (``result.skipped == "nan"``); the caller decides what follows.
    """
    feed.reset()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    config = model.config
    # the global valid-token count is known once every micro-batch has been read, i.e. when the
    # schedule finalises the gradients: bind it there explicitly
    config.finalize_model_grads_func = _FinalizeWithFeed(feed)
    reports = get_forward_backward_func()(
        forward_step_func=make_forward_step(dtype, loss_hook), data_iterator=feed, model=[model],
        num_microbatches=num_micro_batches, seq_length=seq_length, micro_batch_size=1,
        forward_only=False)
    samples, tokens, label_tokens, flops = _sum_dp([feed.samples, feed.tokens,
                                                    feed.label_tokens, feed.flops])
    loss = _mean_loss(reports)["loss"]
    lr = float(optimizer.param_groups[0]["lr"])
    out = StepResult(loss=loss, label_tokens=int(label_tokens), grad_norm=float("nan"), lr=lr,
                     samples=int(samples), tokens=int(tokens), flops=flops,
                     sample_keys=list(feed.keys))
    # fp16: Megatron's loss scaler finds inf/NaN gradients itself (and lowers the scale)
    if not math.isfinite(loss) or not (dtype == torch.float16 or _grads_finite(model)):
        out.skipped = "nan"
        return out
    ok, grad_norm, _ = optimizer.step()
    if not ok:  # fp16 loss-scale overflow: the update is skipped, as in Megatron-LM
        out.skipped = "loss-scale"
        return out
    scheduler.step(increment=global_batch_size)
    out.grad_norm = float(grad_norm) if grad_norm is not None else None
    return out


class _FinalizeWithFeed:
    """``config.finalize_model_grads_func`` of one step: all-reduces the feed's valid label
    tokens over DP ranks and finalises with that count (see :func:`_finalize_with`)."""

    def __init__(self, feed: BatchFeed):
        self.feed = feed

    def __call__(self, model, num_tokens=None, **kwargs):
        (n,) = _sum_dp([self.feed.label_tokens])
        _finalize_with(int(n), model, num_tokens, **kwargs)


def evaluate(model, feed: BatchFeed, iters: int, num_micro_batches: int, seq_length: int,
             dtype: torch.dtype) -> Dict[str, float]:
    """Forward only, up to ``iters`` global batches (fewer if the feed ends):
    ``{"loss", "tokens"}`` over the DP x SP group."""
    reports = []
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(iters):
                try:
                    reports += get_forward_backward_func()(
                        forward_step_func=make_forward_step(dtype), data_iterator=feed,
                        model=[model], num_microbatches=num_micro_batches,
                        seq_length=seq_length, micro_batch_size=1, forward_only=True)
                except StopIteration:
                    break
    finally:
        model.train()
    return _mean_loss(reports)
