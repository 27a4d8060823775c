"""The training loop on Megatron-Core's pieces, driven by a resolved
:class:`~megatron_longvila.config.RunConfig`.

set-up (the builders, also used by the benchmarks): MM-SP/Megatron parallel state -> seeds ->
LongVILAModel (frozen parts per stage) -> Float16Module (bf16/fp16) -> Megatron-Core
DistributedDataParallel -> get_megatron_optimizer (mixed precision, optionally distributed) ->
OptimizerParamScheduler -> resumable data loader.

loop (:func:`train`): resume -> :func:`~megatron_longvila.training.step.train_step` -> log ->
eval -> save. The process group comes from :mod:`megatron_longvila.launch`.
"""

import os
import time
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.enums import ModelType
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from .. import cpu_compat
from ..config import RunConfig
from ..data import build_tokenizer, build_train_loader
from ..data.synthetic import cached_synthetic_dataset, samples_for_run
from ..models import LongVILAModel
from ..parallel.groups import initialize_mmsp
from . import checkpointing, faults
from ..checkpoint import CheckpointError, has_checkpoint
from .exits import ExitPolicy
from .megatron_log import MegatronScalarWriter, Profiler, megatron_log_line, params_norm
from .metrics import MetricsWriter, device_peak_tflops
from .step import BatchFeed, StepResult, evaluate, train_step


def print_rank0(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


class TrainingError(RuntimeError):
    pass


# ------------------------------------------------------------------ builders

def init_parallel_state(cfg: RunConfig):
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    par = cfg.parallel
    initialize_mmsp(tp=par.tensor_model_parallel_size, cp=par.context_parallel_size,
                    ring=par.ring_size, num_heads=cfg.arch.llm.num_attention_heads,
                    num_kv_heads=cfg.arch.llm.num_query_groups)
    assert parallel_state.get_data_parallel_world_size() == par.data_parallel_size


def build_model(cfg: RunConfig) -> Tuple[DistributedDataParallel, LongVILAModel]:
    """LongVILAModel (+ Float16Module) wrapped in Megatron-Core's DDP; returns (ddp, model)."""
    cpu_compat.model_parallel_seed(cfg.training.seed)
    dtype = cfg.model.dtype
    model = LongVILAModel(cfg.arch, dtype=dtype, transformer_impl=cfg.model.transformer_impl,
                          sequence_parallel=cfg.parallel.sequence_parallel,
                          recompute=cfg.model.recompute_granularity,
                          seq_parallel_ring_type=cfg.parallel.ring_type)
    t = set(cfg.training.trainable)
    model.set_trainable(vision="vision" in t, projector="projector" in t, llm="llm" in t)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError(f"--trainable {cfg.training.trainable}: no parameter to train")
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    model.model_type = ModelType.encoder_or_decoder  # read by Megatron's schedules
    if not hasattr(model, "set_input_tensor"):
        # the schedules hand pipeline-stage inputs over through it; with one stage the first
        # (only) stage gets None, nothing to keep
        model.set_input_tensor = lambda input_tensor: None
    config = model.config
    config.calculate_per_token_loss = True  # train_step divides by the global token count
    inner = Float16Module(config, model) if dtype != torch.float32 else model
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
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


def build_optimizer(cfg: RunConfig, ddp):
    """Megatron-Core's optimizer and learning-rate scheduler of the config."""
    o = cfg.optimizer
    precision = cfg.model.precision
    optimizer = get_megatron_optimizer(McoreOptimizerConfig(
        optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        sgd_momentum=o.sgd_momentum, clip_grad=o.clip_grad, bf16=precision == "bf16",
        fp16=precision == "fp16", params_dtype=cfg.model.dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        loss_scale=o.loss_scale, initial_loss_scale=o.initial_loss_scale,
        min_loss_scale=o.min_loss_scale, loss_scale_window=o.loss_scale_window,
        hysteresis=o.hysteresis), [ddp])
    if torch.cuda.is_available():
        use_fused_adam(optimizer)
    wd0 = o.weight_decay if o.start_weight_decay is None else o.start_weight_decay
    wd1 = o.weight_decay if o.end_weight_decay is None else o.end_weight_decay
    scheduler = OptimizerParamScheduler(  # lengths in samples, as Megatron-LM
        optimizer, init_lr=o.lr_warmup_init, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=o.decay_steps,
        lr_decay_style=o.lr_decay_style, start_wd=wd0, end_wd=wd1,
        wd_incr_steps=o.wd_incr_steps, wd_incr_style=o.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
        wsd_decay_steps=o.wsd_decay_steps,
        lr_wsd_decay_style="linear" if o.wsd_decay_steps is not None else None)
    ddp.config.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler


def prepare_data(cfg: RunConfig) -> List[str]:
    """--data-path, or the embedded default: synthetic videos (sized to the run, cached by
    their settings) made by rank 0."""
    d, t = cfg.data, cfg.training
    if d.data_path:
        return list(d.data_path)
    box = [None]
    if dist.get_rank() == 0:
        text = d.synthetic_text_only  # text samples cost nothing to make: all of them
        n = d.synthetic_videos if text else samples_for_run(
            d.synthetic_videos, t.train_iters, t.global_batch_size,
            cfg.parallel.data_parallel_size * max(1, d.num_workers))
        t0 = time.time()
        try:
            path, reused = cached_synthetic_dataset(
                d.synthetic_dir, num_videos=0 if text else n, num_text_only=n if text else 0,
                num_frames=d.synthetic_frames, frames_per_video=max(12, d.synthetic_frames),
                image_size=cfg.arch.vision.image_size, seed=t.seed, shard_max_samples=16,
                num_workers=os.cpu_count() or 1, progress=True)
        except FileExistsError as e:
            raise TrainingError(f"--synthetic-dir: {e}") from e
        print(f"no --data-path: {n} synthetic {'text samples' if text else 'videos'} "
              f"(of --synthetic-videos {d.synthetic_videos}: sized to the run) "
              f"{'reused from' if reused else 'written to'} {path} ({time.time() - t0:.1f}s)",
              flush=True)
        box = [path]
    dist.broadcast_object_list(box, src=0)
    return box


def build_loader(cfg: RunConfig, data_paths, tokenizer, epochs=None, shuffle=None,
                 num_workers=None):
    d, t = cfg.data, cfg.training
    return build_train_loader(
        data_paths, tokenizer, seq_length=t.seq_length, micro_batch_size=t.micro_batch_size,
        tokens_per_frame=cfg.arch.tokens_per_frame, image_size=cfg.arch.vision.image_size,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(), seed=t.seed,
        num_workers=d.num_workers if num_workers is None else num_workers,
        num_frames=d.num_frames, drop_or_subsample=d.drop_or_subsample,
        shuffle=d.shuffle if shuffle is None else shuffle, epochs=epochs,
        skip_bad_samples=d.skip_bad_samples)


# ------------------------------------------------------------------ the loop's pieces

def resume(cfg: RunConfig, ddp, optimizer, scheduler, loader) -> Tuple[int, Dict[str, int]]:
    """Load --load if it holds a checkpoint: ``(iteration, consumed counters)``."""
    c = cfg.checkpoint
    consumed = {"samples": 0, "micro_batches": 0, "skipped_iterations": 0}
    if not (c.load and has_checkpoint(c.load)):
        if c.load and c.exit_on_missing_checkpoint:
            raise TrainingError(f"--load {c.load} holds no checkpoint "
                                "(--exit-on-missing-checkpoint)")
        if c.load:
            print_rank0(f"--load {c.load} holds no checkpoint yet: starting from scratch")
        return 0, consumed
    t0 = time.time()
    try:
        info = checkpointing.load_checkpoint(
            c.load, ddp, optimizer=optimizer if c.load_optim else None, scheduler=scheduler,
            loader=loader if c.load_loader_state else None, finetune=c.finetune,
            load_rng=c.load_rng, iteration=c.ckpt_step)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise TrainingError(f"--load {c.load}: {e}") from e
    if not info["finetune"] and info.get("consumed"):
        consumed.update(info["consumed"])
    print_rank0(f"loaded {info['path']} ({', '.join(info['loaded'])}; "
                f"{'weights only, ' if info['finetune'] else ''}iteration {info['iteration']}) "
                f"in {time.time() - t0:.1f}s")
    return info["iteration"], consumed


def save(cfg: RunConfig, iteration, ddp, optimizer, scheduler, loader, consumed):
    t0 = time.time()
    try:
        path = checkpointing.save_checkpoint(
            cfg.checkpoint.save, iteration, ddp, optimizer=optimizer, scheduler=scheduler,
            loader=loader, args=cfg.to_dict(), config=cfg.arch, consumed=consumed,
            keep_last=cfg.checkpoint.keep_last_checkpoints,
            before_commit=faults.kill_during_save(cfg.debug.kill_during_save, iteration),
            optim_sharding="fully_reshardable" if cfg.checkpoint.optim_fully_reshardable
            else "dp_reshardable")
    except CheckpointError as e:  # disk full, read-only, I/O error: one line, data kept
        raise TrainingError(str(e)) from e
    print_rank0(f"saved checkpoint {path} in {time.time() - t0:.1f}s")


def check_step(cfg: RunConfig, res: StepResult, iteration: int, consumed: Dict[str, int]):
    """--on-nan: stop on a NaN/Inf step, or count the skipped update (up to a limit)."""
    if res.skipped == "loss-scale":
        consumed["loss_scale_skips"] = consumed.get("loss_scale_skips", 0) + 1
    if res.label_tokens == 0 and res.skipped != "nan":
        n = consumed["empty_label_iterations"] = consumed.get("empty_label_iterations", 0) + 1
        if n > cfg.training.max_skipped_iters:
            raise TrainingError(
                f"iteration {iteration}: {n} iterations had no label token at all (loss 0, "
                f"nothing learnt), more than --max-skipped-iters {cfg.training.max_skipped_iters}:"
                " every target of the data is masked (check the samples' answers, the chat "
                "template and --seq-length)")
        print_rank0(f"[warning] iteration {iteration}: the global batch has no label token "
                    f"(loss 0, nothing learnt; {n} such iterations so far)")
    if res.skipped != "nan":
        return
    consumed["skipped_iterations"] += 1
    t = cfg.training
    if t.on_nan == "stop":
        raise TrainingError(f"iteration {iteration}: loss {res.loss} or its gradient is NaN/Inf; "
                            "stopping (use --on-nan skip to skip such updates)")
    if consumed["skipped_iterations"] > t.max_skipped_iters:
        raise TrainingError(f"iteration {iteration}: {consumed['skipped_iterations']} updates "
                            f"skipped for NaN/Inf, more than --max-skipped-iters "
                            f"{t.max_skipped_iters}")
    print_rank0(f"iteration {iteration}: NaN/Inf loss or gradient, update skipped "
                f"({consumed['skipped_iterations']} so far)")


def validate(cfg: RunConfig, ddp, data_paths, tokenizer) -> Dict[str, float]:
    """The validation loss over --eval-iters global batches of one ordered pass."""
    t = cfg.training
    loader = build_loader(cfg, data_paths, tokenizer, epochs=1, shuffle=False, num_workers=0)
    try:
        return evaluate(ddp, BatchFeed(loader, cfg.arch, t.trainable), cfg.logging.eval_iters,
                        t.num_micro_batches, t.seq_length * t.micro_batch_size, cfg.model.dtype)
    finally:
        loader.close()


def step_record(cfg: RunConfig, res: StepResult, iteration, dt, consumed, peak,
                loss_scale: float = 1.0) -> Dict[str, Any]:
    rec = {"iteration": iteration, "loss": res.loss, "grad_norm": res.grad_norm, "lr": res.lr,
           "tokens_per_s": res.tokens / dt, "label_tokens": res.label_tokens,
           "samples": res.samples, "consumed_samples": consumed["samples"],
           "skipped_iterations": consumed["skipped_iterations"], "iteration_time_s": dt,
           "tflops_per_gpu": res.flops / dt / cfg.parallel.world_size / 1e12}
    if peak:
        rec["mfu"] = rec["tflops_per_gpu"] / peak
    # Megatron-LM's scalars (tag names in megatron_log.TAGS)
    rec.update(global_batch_size=cfg.training.global_batch_size, world_size=cfg.parallel.world_size,
               throughput=rec["tflops_per_gpu"], loss_scale=loss_scale,
               skipped_this_iteration=int(res.skipped is not None),
               nan_this_iteration=int(res.skipped == "nan"))
    if cfg.logging.log_sample_keys:
        g = parallel_state.get_data_parallel_group()
        parts = [None] * dist.get_world_size(g)  # every DP rank's keys, in DP-rank order
        dist.all_gather_object(parts, res.sample_keys, group=g)
        rec["sample_keys"] = [k for part in parts for k in part]
    return rec


def log_line(cfg: RunConfig, rec: Dict[str, Any]) -> str:
    gn = rec["grad_norm"]
    rate = (f"{rec['tflops_per_gpu']:.1f} TFLOP/s/GPU" if torch.cuda.is_available()
            else f"{1000 * rec['tflops_per_gpu']:.2f} GFLOP/s/rank")
    mfu = f" | MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else ""
    return (f"iteration {rec['iteration']:6d}/{cfg.training.train_iters} | loss "
            f"{rec['loss']:.4f} | grad norm {gn if gn is None else round(gn, 4)} | lr "
            f"{rec['lr']:.3e} | {rec['tokens_per_s']:.0f} tokens/s | {rate}{mfu} | samples "
            f"{rec['consumed_samples']} | {rec['iteration_time_s'] * 1000:.0f} ms")


def describe(cfg: RunConfig, model) -> str:
    n = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t = cfg.training
    return (f"model {cfg.model.name}: {n / 1e6:.2f}M parameters on rank 0 ({n_train / 1e6:.2f}M "
            f"trainable: {', '.join(t.trainable)}); layout {cfg.parallel.describe()}; backend "
            f"{cfg.parallel.distributed_backend}; global batch {t.global_batch_size} = micro "
            f"{t.micro_batch_size} x DP {cfg.parallel.data_parallel_size} x "
            f"{t.num_micro_batches} accumulation steps")


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------ the loop

def train(cfg: RunConfig) -> Dict[str, Any]:
    """Run the training described by a resolved ``cfg`` (process group up). Returns a summary."""
    t, lg = cfg.training, cfg.logging
    init_parallel_state(cfg)
    ddp, model = build_model(cfg)
    optimizer, scheduler = build_optimizer(cfg, ddp)
    print_rank0(describe(cfg, model))
    data_paths = prepare_data(cfg)
    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer_model, template=cfg.data.chat_template)
    except ValueError as e:
        raise TrainingError(f"--tokenizer-model {cfg.data.tokenizer_model}: {e}") from e
    if tokenizer.vocab_size > cfg.arch.llm.vocab_size:
        raise TrainingError(f"tokenizer {cfg.data.tokenizer_model} has {tokenizer.vocab_size} "
                            f"ids, the model's vocabulary only {cfg.arch.llm.vocab_size}")
    exits = ExitPolicy(t)  # before the loader forks its workers (they inherit the handler)
    loader = build_loader(cfg, data_paths, tokenizer)
    writer = MetricsWriter(lg.metrics_file, None, dist.get_rank())
    scalars = MegatronScalarWriter(cfg, dist.get_rank())
    profiler = Profiler(lg, dist.get_rank())
    feed = BatchFeed(loader, cfg.arch, t.trainable)
    peak = device_peak_tflops(lg.peak_tflops)
    rows = t.seq_length * t.micro_batch_size
    first_losses: List[float] = []
    last: Dict[str, Any] = {}
    t_start = time.time()
    c = cfg.checkpoint
    try:
        iteration, consumed = resume(cfg, ddp, optimizer, scheduler, loader)
        while iteration < t.train_iters:
            profiler.before(iteration + 1)
            _synchronize()
            t0 = time.time()
            res = train_step(ddp, optimizer, scheduler, feed, t.num_micro_batches, rows,
                             t.global_batch_size, cfg.model.dtype,
                             faults.nan_loss_hook(cfg.debug.nan_at_iteration, iteration + 1))
            iteration += 1
            check_step(cfg, res, iteration, consumed)
            _synchronize()
            consumed["samples"] += res.samples
            consumed["micro_batches"] += t.num_micro_batches * cfg.parallel.data_parallel_size
            last = step_record(cfg, res, iteration, time.time() - t0, consumed, peak,
                               float(optimizer.get_loss_scale()))
            if lg.log_params_norm:
                last["params_norm"] = params_norm(model)
            writer.write(last)
            scalars.write(last)
            first_losses += [res.loss] if len(first_losses) < 64 else []
            if iteration % lg.log_interval == 0 or iteration == t.train_iters:
                print_rank0(megatron_log_line(last, t.train_iters, lg.log_throughput,
                                              lg.timing_log_level))
            trace = profiler.after(iteration)
            if trace:
                print_rank0(f"profile of iterations {lg.profile_step_start}-{iteration}: {trace}")
            if lg.eval_interval and iteration % lg.eval_interval == 0:
                ev = validate(cfg, ddp, cfg.data.valid_data_path or data_paths, tokenizer)
                print_rank0(f"validation at iteration {iteration} | lm loss value: "
                            f"{ev['loss']:.6E} | ({ev['tokens']} tokens)")
                writer.write({"iteration": iteration, "val_loss": ev["loss"]})
                scalars.write_validation(iteration, ev["loss"], consumed["samples"])
            saved = False
            if c.save and ((c.save_interval and iteration % c.save_interval == 0)
                           or iteration == t.train_iters):
                save(cfg, iteration, ddp, optimizer, scheduler, loader, consumed)
                saved = True
            faults.kill_after_iteration(cfg.debug.kill_after_iteration, iteration)
            reason = exits.check(iteration)
            if reason and iteration < t.train_iters:
                if c.save and not saved:
                    save(cfg, iteration, ddp, optimizer, scheduler, loader, consumed)
                print_rank0(f"exiting after iteration {iteration}: {reason}"
                            f"{'' if c.save else ' (no --save: nothing saved)'}")
                break
    finally:
        exits.restore()
        profiler.stop(iteration if "iteration" in locals() else 0)
        writer.close()
        scalars.close()
        loader.close()
    print_rank0(f"done: {iteration} iterations in {time.time() - t_start:.1f}s")
    return {"iteration": iteration, "first_losses": first_losses, "last": last,
            "consumed": consumed}
