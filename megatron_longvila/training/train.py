"""The training loop on Megatron-Core's pieces.

setup: process group (NCCL on GPUs, gloo on CPUs) -> MM-SP/Megatron parallel state -> seeds ->
LongVILAModel (frozen parts per stage) -> Float16Module (bf16/fp16) -> Megatron-Core
DistributedDataParallel -> get_megatron_optimizer (mixed precision, optionally distributed) ->
OptimizerParamScheduler -> resumable data loader -> load checkpoint.

step: get_forward_backward_func() runs the micro-batches (gradient accumulation) with a
per-token loss (``calculate_per_token_loss``): each micro-batch returns its loss sum and token
count, Megatron's finalize_model_grads divides the gradients by the token count of the whole
global batch (all-reduced over DP x SP). The result equals the single-process gradient of the
mean token loss of the global batch at every TP x SP x DP layout.
"""

import math
import os
import signal
import socket
import sys
import time
from contextlib import nullcontext
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from .. import cpu_compat
from ..checkpoint import has_checkpoint
from ..constants import IGNORE_INDEX
from . import checkpointing
from .metrics import MetricsWriter, device_peak_tflops, micro_batch_flops


def print_rank0(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


class TrainingError(RuntimeError):
    pass


# ------------------------------------------------------------------ set-up

def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(args):
    """torch.distributed with NCCL on GPUs, gloo on CPUs (torchrun or a plain one-process run)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python pretrain_longvila.py`: a one-process world
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    backend = args.distributed_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise TrainingError("--distributed-backend nccl needs CUDA GPUs; none is visible")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        cpu_compat.enable()
    import datetime
    dist.init_process_group(backend, timeout=datetime.timedelta(
        minutes=args.distributed_timeout_minutes))
    args.backend = backend


def init_parallel_state(args):
    from megatron.core import parallel_state

    from ..parallel.groups import initialize_mmsp
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    cfg = args.model_config
    initialize_mmsp(tp=args.tensor_model_parallel_size, cp=args.context_parallel_size,
                    ring=args.seq_parallel_ring_size, num_heads=cfg.llm.num_attention_heads,
                    num_kv_heads=cfg.llm.num_query_groups)
    assert parallel_state.get_data_parallel_world_size() == args.data_parallel_size


def model_dtype(args):
    return torch.bfloat16 if args.bf16 else (torch.float16 if args.fp16 else torch.float32)


def build_model(args):
    """LongVILAModel (+ Float16Module) wrapped in Megatron-Core's DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    from ..models import LongVILAModel
    cpu_compat.model_parallel_seed(args.seed)
    dtype = model_dtype(args)
    model = LongVILAModel(args.model_config, dtype=dtype, transformer_impl=args.transformer_impl,
                          sequence_parallel=args.sequence_parallel,
                          recompute=args.recompute_granularity,
                          seq_parallel_ring_type=args.seq_parallel_ring_type)
    t = set(args.trainable)
    model.set_trainable(vision="vision" in t, projector="projector" in t, llm="llm" in t)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError(f"--trainable {args.trainable}: no parameter to train")
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    from megatron.core.enums import ModelType
    model.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
    if not hasattr(model, "set_input_tensor"):
        # the schedules hand pipeline-stage inputs over through it; with one stage the first
        # (only) stage gets None, nothing to keep
        model.set_input_tensor = lambda input_tensor: None
    config = model.config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    inner = Float16Module(config, model) if dtype != torch.float32 else model
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False, bucket_size=None)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=inner)
    config.no_sync_func = ddp.no_sync
    return ddp, model


def use_fused_adam(optimizer) -> bool:
    """Megatron-Core without TE/apex steps with torch.optim.Adam(W) in its default (foreach)
    implementation; switch the inner torch optimizers to torch's fused CUDA kernel (the same
    update in one launch per parameter group). Returns whether any optimizer was switched."""
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    switched = False
    for o in inner:
        if isinstance(o, torch.optim.Optimizer) and "fused" in o.defaults:
            o.defaults["fused"], o.defaults["foreach"] = True, False
            for g in o.param_groups:
                g["fused"], g["foreach"] = True, False
            switched = True
    return switched


def build_optimizer(args, ddp):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    oc = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16,
        params_dtype=model_dtype(args), use_distributed_optimizer=args.use_distributed_optimizer,
        loss_scale=None, initial_loss_scale=2 ** 16, hysteresis=2)
    optimizer = get_megatron_optimizer(oc, [ddp])
    if torch.cuda.is_available():
        use_fused_adam(optimizer)
    gbs = args.global_batch_size
    wsd = args.lr_wsd_decay_iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=None if wsd is None else wsd * gbs,
        lr_wsd_decay_style="linear" if wsd is not None else None)
    ddp.config.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler


def ensure_data(args):
    """--data-path, or the embedded default: synthetic videos written on the fly (rank 0)."""
    if args.data_path:
        return list(args.data_path)
    cfg = args.model_config
    path = [None]
    if dist.get_rank() == 0:
        from ..data.synthetic import cached_synthetic_dataset, samples_for_run
        text = args.synthetic_text_only  # text samples cost nothing to make: all of them
        n = args.synthetic_videos if text else samples_for_run(
            args.synthetic_videos, args.train_iters, args.global_batch_size,
            args.data_parallel_size * max(1, args.num_workers))
        t0 = time.time()
        try:
            d, reused = cached_synthetic_dataset(
                args.synthetic_dir, num_videos=0 if text else n, num_text_only=n if text else 0,
                num_frames=args.synthetic_frames, frames_per_video=max(12, args.synthetic_frames),
                image_size=cfg.vision.image_size, seed=args.seed, shard_max_samples=16,
                num_workers=os.cpu_count() or 1, progress=True)
        except FileExistsError as e:
            raise TrainingError(f"--synthetic-dir: {e}") from e
        print(f"no --data-path: {n} synthetic {'text samples' if text else 'videos'} "
              f"(of --synthetic-videos {args.synthetic_videos}: sized to the run) "
              f"{'reused from' if reused else 'written to'} {d} ({time.time() - t0:.1f}s)",
              flush=True)
        path = [d]
    dist.broadcast_object_list(path, src=0)
    return path


def build_loader(args, data_paths, tokenizer, epochs=None, shuffle=None, num_workers=None):
    from megatron.core import parallel_state

    from ..data import build_train_loader
    cfg = args.model_config
    return build_train_loader(
        data_paths, tokenizer, seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        tokens_per_frame=cfg.tokens_per_frame, image_size=cfg.vision.image_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(), seed=args.seed,
        num_workers=args.num_workers if num_workers is None else num_workers,
        num_frames=args.num_frames, drop_or_subsample=args.drop_or_subsample,
        shuffle=(not args.no_shuffle) if shuffle is None else shuffle, epochs=epochs)


# ------------------------------------------------------------------ one step

class _BatchFeed:
    """The data iterator handed to Megatron's schedule; records what each micro-batch held."""

    def __init__(self, loader, device, model_cfg, trainable):
        self.loader, self.device, self.model_cfg, self.trainable = loader, device, model_cfg, trainable
        self.reset()

    def reset(self):
        self.samples = 0
        self.tokens = 0
        self.label_tokens = 0
        self.flops = 0.0
        self.keys: List[str] = []

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.loader)
        self.samples += int(b["num_samples"])
        self.tokens += int(b["tokens"].numel())
        self.label_tokens += int((b["labels"] != IGNORE_INDEX).sum())
        self.flops += micro_batch_flops(self.model_cfg, b, self.trainable)
        self.keys.extend(b.get("sample_keys", []))
        out = {}
        for k in ("tokens", "labels", "position_ids", "cu_seqlens", "frames", "frames_per_sample"):
            out[k] = b[k].to(self.device, non_blocking=True)
        return out


def _make_forward_step(unwrapped, dtype, nan_at=None, state=None):

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        frames = b["frames"].to(dtype) if dtype != torch.float32 else b["frames"]
        out = model(b["tokens"], b["position_ids"], frames, b["labels"], b["cu_seqlens"],
                    b["frames_per_sample"])
        losses = out.output  # this rank's rows (its MM-SP shard at SP > 1)
        mask = out.loss_mask.to(losses.dtype)
        if nan_at is not None and state is not None and state["iteration"] + 1 == nan_at:
            losses = losses * float("nan")  # test hook: --debug-nan-at-iteration

        def loss_func(output):
            total = (output.float() * mask).sum()
            count = mask.sum().to(torch.int)
            report = torch.stack([total.detach(), mask.sum().detach().float()])
            return total, count, {"lm loss": report}

        return losses, loss_func

    return forward_step


def _grads_finite(ddp) -> bool:
    ok = True
    for p in ddp.module.parameters():
        g = getattr(p, "main_grad", None)
        if g is not None and not torch.isfinite(g).all():
            ok = False
            break
    flag = torch.tensor([1.0 if ok else 0.0], device=_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def _reduce_loss(losses_reduced) -> Dict[str, float]:
    """Sum of (loss sum, token count) over micro-batches and the DP x SP group."""
    from megatron.core import parallel_state
    if not losses_reduced:
        return {"loss": float("nan"), "tokens": 0}
    tot = torch.zeros(2, dtype=torch.float64, device=_device())
    for r in losses_reduced:
        tot += r["lm loss"].to(torch.float64).to(tot.device)
    dist.all_reduce(tot, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return {"loss": float(tot[0] / tot[1].clamp(min=1)), "tokens": int(tot[1])}


def _all_reduce_dp(values: List[float]) -> List[float]:
    from megatron.core import parallel_state
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return t.tolist()


def _gather_keys(keys: List[str]) -> List[str]:
    """Sample keys of every DP rank (for the exact-resume check), DP-rank order."""
    from megatron.core import parallel_state
    g = parallel_state.get_data_parallel_group()
    out = [None] * dist.get_world_size(g)
    dist.all_gather_object(out, keys, group=g)
    return [k for part in out for k in part]


# ------------------------------------------------------------------ the loop

def args_for_checkpoint(args) -> Dict[str, Any]:
    skip = {"model_config", "debug_kill_after_iteration", "debug_kill_during_save"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def evaluate(args, ddp, unwrapped, data_paths, tokenizer):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    loader = build_loader(args, data_paths, tokenizer, epochs=1, shuffle=False, num_workers=0)
    feed = _BatchFeed(loader, _device(), args.model_config, args.trainable)
    fb = get_forward_backward_func()
    ddp.eval()
    losses = []
    try:
        with torch.no_grad():
            for _ in range(args.eval_iters):
                try:
                    losses += fb(forward_step_func=_make_forward_step(unwrapped, model_dtype(args)),
                                 data_iterator=feed, model=[ddp],
                                 num_microbatches=args.num_micro_batches,
                                 seq_length=args.seq_length * args.micro_batch_size,
                                 micro_batch_size=1, forward_only=True)
                except StopIteration:
                    break
    finally:
        loader.close()
        ddp.train()
    return _reduce_loss(losses)


def train(args) -> Dict[str, Any]:
    """Run the training described by validated ``args``. Returns a summary."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from ..data import build_tokenizer
    rank = dist.get_rank()
    init_parallel_state(args)
    ddp, unwrapped = build_model(args)
    optimizer, scheduler = build_optimizer(args, ddp)
    n_params = sum(p.numel() for p in unwrapped.parameters())
    n_train = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    print_rank0(f"model {args.model}: {n_params / 1e6:.2f}M parameters on rank 0 "
                f"({n_train / 1e6:.2f}M trainable: {', '.join(args.trainable)}); layout "
                f"TP={args.tensor_model_parallel_size} x SP={args.context_parallel_size} "
                f"({args.context_parallel_size // args.seq_parallel_ring_size} Ulysses x "
                f"{args.seq_parallel_ring_size} ring, {args.seq_parallel_ring_type}) x "
                f"DP={args.data_parallel_size}; backend {args.backend}; global batch "
                f"{args.global_batch_size} = micro {args.micro_batch_size} x DP "
                f"{args.data_parallel_size} x {args.num_micro_batches} accumulation steps")

    data_paths = ensure_data(args)
    tokenizer = build_tokenizer(args.tokenizer_model, template=args.chat_template)
    if tokenizer.vocab_size > args.model_config.llm.vocab_size:
        raise TrainingError(f"tokenizer {args.tokenizer_model} has {tokenizer.vocab_size} ids, "
                            f"the model's vocabulary only {args.model_config.llm.vocab_size}")
    loader = build_loader(args, data_paths, tokenizer)

    iteration, consumed = 0, {"samples": 0, "micro_batches": 0, "skipped_iterations": 0}
    if args.load and has_checkpoint(args.load):
        t0 = time.time()
        try:
            info = checkpointing.load_checkpoint(
                args.load, ddp, optimizer=None if args.no_load_optim else optimizer,
                scheduler=scheduler, loader=None if args.no_load_loader_state else loader,
                finetune=args.finetune,
                load_rng=not args.no_load_rng, iteration=args.ckpt_step)
        except (ValueError, FileNotFoundError, KeyError) as e:
            raise TrainingError(f"--load {args.load}: {e}") from e
        iteration = info["iteration"]
        if not info["finetune"] and info.get("consumed"):
            consumed.update(info["consumed"])
        print_rank0(f"loaded {info['path']} ({', '.join(info['loaded'])}; "
                    f"{'weights only, ' if info['finetune'] else ''}iteration {iteration}) "
                    f"in {time.time() - t0:.1f}s")
    elif args.load:
        print_rank0(f"--load {args.load} holds no checkpoint yet: starting from scratch")

    writer = MetricsWriter(args.metrics_file, args.tensorboard_dir, rank)
    peak = device_peak_tflops(args.peak_tflops)
    fb = get_forward_backward_func()
    dtype = model_dtype(args)
    state = {"iteration": iteration}
    forward_step = _make_forward_step(unwrapped, dtype, getattr(args, "debug_nan_at_iteration", None),
                                      state)
    feed = _BatchFeed(loader, _device(), args.model_config, args.trainable)
    first_losses: List[float] = []
    world = dist.get_world_size()
    t_start = time.time()
    last = {}
    try:
        while iteration < args.train_iters:
            state["iteration"] = iteration
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.time()
            feed.reset()
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            losses_reduced = fb(forward_step_func=forward_step, data_iterator=feed, model=[ddp],
                                num_microbatches=args.num_micro_batches,
                                seq_length=args.seq_length * args.micro_batch_size,
                                micro_batch_size=1, forward_only=False)
            red = _reduce_loss(losses_reduced)
            lr_used = float(optimizer.param_groups[0]["lr"])
            # fp16: Megatron's loss scaler finds inf/NaN gradients itself (and lowers the scale)
            finite = math.isfinite(red["loss"]) and (args.fp16 or _grads_finite(ddp))
            if finite:
                ok, grad_norm, _ = optimizer.step()
                if ok:
                    scheduler.step(increment=args.global_batch_size)
                else:  # fp16 loss-scale overflow: the update is skipped, as in Megatron-LM
                    consumed["loss_scale_skips"] = consumed.get("loss_scale_skips", 0) + 1
                    grad_norm = float("nan")
            else:
                consumed["skipped_iterations"] += 1
                if args.on_nan == "stop":
                    raise TrainingError(
                        f"iteration {iteration + 1}: loss {red['loss']} or its gradient is "
                        f"NaN/Inf; stopping (use --on-nan skip to skip such updates)")
                if consumed["skipped_iterations"] > args.max_skipped_iters:
                    raise TrainingError(
                        f"iteration {iteration + 1}: {consumed['skipped_iterations']} updates "
                        f"skipped for NaN/Inf, more than --max-skipped-iters "
                        f"{args.max_skipped_iters}")
                grad_norm = float("nan")
                print_rank0(f"iteration {iteration + 1}: NaN/Inf loss or gradient, update "
                            f"skipped ({consumed['skipped_iterations']} so far)")
            iteration += 1
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.time() - t0
            samples, tokens, label_tokens, flops = _all_reduce_dp(
                [feed.samples, feed.tokens, feed.label_tokens, feed.flops])
            # every TP/SP rank of a DP rank counted the same micro-batches
            consumed["samples"] += int(samples)
            consumed["micro_batches"] += args.num_micro_batches * args.data_parallel_size
            rec = {"iteration": iteration, "loss": red["loss"],
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "lr": lr_used,
                   "tokens_per_s": tokens / dt, "label_tokens": int(label_tokens),
                   "samples": int(samples), "consumed_samples": consumed["samples"],
                   "skipped_iterations": consumed["skipped_iterations"],
                   "iteration_time_s": dt, "tflops_per_gpu": flops / dt / world / 1e12}
            if peak:
                rec["mfu"] = rec["tflops_per_gpu"] / peak
            if getattr(args, "log_sample_keys", False):
                rec["sample_keys"] = _gather_keys(feed.keys)
            writer.write(rec)
            last = rec
            if len(first_losses) < 64:
                first_losses.append(red["loss"])
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                mfu = f" | MFU {100 * rec['mfu']:.1f}%" if peak else ""
                rate = (f"{rec['tflops_per_gpu']:.1f} TFLOP/s/GPU" if torch.cuda.is_available()
                        else f"{1000 * rec['tflops_per_gpu']:.2f} GFLOP/s/rank")
                print_rank0(
                    f"iteration {iteration:6d}/{args.train_iters} | loss {red['loss']:.4f} | "
                    f"grad norm {rec['grad_norm'] if rec['grad_norm'] is None else round(rec['grad_norm'], 4)} | "
                    f"lr {rec['lr']:.3e} | {rec['tokens_per_s']:.0f} tokens/s | "
                    f"{rate}{mfu} | samples "
                    f"{consumed['samples']} | {dt * 1000:.0f} ms")
            if args.eval_interval and iteration % args.eval_interval == 0:
                ev = evaluate(args, ddp, unwrapped, args.valid_data_path or data_paths, tokenizer)
                print_rank0(f"validation at iteration {iteration} | loss {ev['loss']:.4f} "
                            f"({ev['tokens']} tokens)")
                writer.write({"iteration": iteration, "val_loss": ev["loss"]})
            save_now = args.save and ((args.save_interval and iteration % args.save_interval == 0)
                                      or iteration == args.train_iters)
            if save_now:
                _save(args, iteration, ddp, optimizer, scheduler, loader, consumed)
            if args.debug_kill_after_iteration == iteration:
                print_rank0(f"[test] SIGKILL after iteration {iteration}")
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        writer.close()
        loader.close()
        if getattr(args, "synthetic_tmp", None):
            import shutil
            shutil.rmtree(args.synthetic_tmp, ignore_errors=True)
    total = time.time() - t_start
    print_rank0(f"done: {iteration} iterations in {total:.1f}s")
    return {"iteration": iteration, "first_losses": first_losses, "last": last,
            "consumed": consumed}


def _save(args, iteration, ddp, optimizer, scheduler, loader, consumed):
    t0 = time.time()
    path = checkpointing.save_checkpoint(
        args.save, iteration, ddp, optimizer=optimizer, scheduler=scheduler, loader=loader,
        args=args_for_checkpoint(args), config=args.model_config, consumed=consumed,
        keep_last=args.keep_last_checkpoints,
        before_commit=_kill_during_save if args.debug_kill_during_save == iteration else None,
        optim_sharding="fully_reshardable" if getattr(args, "dist_ckpt_optim_fully_reshardable",
                                                      False) else "dp_reshardable")
    print_rank0(f"saved checkpoint {path} in {time.time() - t0:.1f}s")


def _kill_during_save(path):
    """Test hook: SIGKILL this process once the tensor files of the save are written but before
    the checkpoint is renamed into place and named by the tracker."""
    print(f"[test] SIGKILL during the save into {path}", flush=True)
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
