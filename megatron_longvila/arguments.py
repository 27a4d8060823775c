"""Command-line flags of ``pretrain_longvila.py``: Megatron-LM's names where Megatron has the
concept, LongVILA's where it does not; every combination validated up front, errors naming the
numbers.

``parse_args(argv)`` parses only; ``validate_args(args, world_size)`` checks everything that can
be checked before a process group exists (sizes, divisibility, paths) and fills derived values
(data-parallel size, gradient-accumulation steps, the model config).
"""

import argparse
import os
from typing import List, Optional

from .data.text import is_text_source
from .parallel.groups import add_mmsp_arguments, resolve_mmsp_arguments

STAGES = ("align", "pretrain", "sft", "context-extension", "long-sft")
# LongVILA's recipe: which parts each stage trains (vision tower, projector, LLM).
STAGE_TRAINABLE = {
    "align": ("projector",),
    "pretrain": ("projector", "llm"),
    "sft": ("vision", "projector", "llm"),
    "context-extension": ("llm",),
    "long-sft": ("vision", "projector", "llm"),
}
TRAINABLE_PARTS = ("vision", "projector", "llm")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_longvila.py",
        description="LongVILA training on Megatron-Core. With no --data-path, a tiny model "
                    "trains on synthetic videos made on the fly.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)

    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny",
                   help="model preset: tiny, qwen2-1.5b, qwen2-7b, llama3-8b (ignored for the "
                        "architecture when --load holds longvila_config.json, unless "
                        "--override-checkpoint-config)")
    g.add_argument("--vision-model", default=None,
                   help="vision preset (tiny, siglip-so400m-patch14-384); default: the model's")
    g.add_argument("--projector-type", default="mlp_downsample")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--rotary-base", type=float, default=None,
                   help="RoPE base (stage 4 raises it for the longer context)")
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--override-checkpoint-config", action="store_true",
                   help="build the model from the flags even if --load has a config")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine", "auto"),
                   default="auto",
                   help="auto: the local spec (verified on CPU and GPU) until a Transformer "
                        "Engine run is measured; transformer_engine: runs it and warns that this "
                        "path is not verified")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="only 1 is supported (LongVILA uses TP x SP x DP)")
    g.add_argument("--context-parallel-size", type=int, default=None,
                   help="MM-SP size (= --seq-parallel-size)")
    g.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs="+", default=None,
                   help="ULYSSES RING (= --seq-parallel-ring-size RING)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron's tensor-parallel sequence parallelism (norms/dropout)")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--distributed-backend", choices=("auto", "nccl", "gloo"), default="auto")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30)
    add_mmsp_arguments(p)

    g = p.add_argument_group("training")
    g.add_argument("--stage", choices=STAGES, default=None,
                   help="LongVILA stage: sets the trainable parts (see --trainable)")
    g.add_argument("--trainable", nargs="+", choices=TRAINABLE_PARTS, default=None,
                   help="parts to train (default: the stage's, else all)")
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro-batch size x data-parallel size")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"))
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--on-nan", choices=("stop", "skip"), default="stop",
                   help="a NaN/Inf loss or gradient stops training naming the iteration, or "
                        "skips the update (counted)")
    g.add_argument("--max-skipped-iters", type=int, default=10,
                   help="with --on-nan skip: stop after this many skipped iterations")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--finetune", action="store_true",
                   help="load weights only from --load: iteration 0, fresh optimizer/scheduler/"
                        "loader (the next stage of the recipe)")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="load this iteration of --load instead of the latest")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-load-loader-state", action="store_true",
                   help="resume model/optimizer/scheduler but restart the sample stream (needed "
                        "when the data-parallel size or the data changed)")
    g.add_argument("--keep-last-checkpoints", type=int, default=None)
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="with --use-distributed-optimizer: save its state per parameter in model "
                        "space (loads at any TP x SP x DP; gathers the state over DP at each "
                        "save) instead of Megatron's default dp_reshardable shards (fully "
                        "parallel; load at another DP/SP size, same TP)")
    # test hooks: SIGKILL this process at a point of the run (exact-resume / crash tests)
    g.add_argument("--debug-kill-after-iteration", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--debug-kill-during-save", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--debug-nan-at-iteration", type=int, default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="WebDataset shard directories and text corpora (.jsonl/.json/.parquet "
                        "with a 'text' field, Megatron indexed PREFIX.bin/.idx), Megatron-style "
                        "weights allowed: W1 PATH1 W2 PATH2. None: synthetic videos made on the fly")
    g.add_argument("--valid-data-path", nargs="+", default=None)
    g.add_argument("--tokenizer-model", default=None,
                   help="'tiny', an HF tokenizer directory or a sentencepiece model "
                        "(default: tiny for the tiny model)")
    g.add_argument("--chat-template", choices=("qwen2", "llama3", "auto", "llama_3", "hermes-2"),
                   default=None, help="auto: the tokenizer's own template as VILA applies it "
                   "(default when the tokenizer has one); llama_3 / hermes-2: VILA's conversation "
                   "modes; qwen2 / llama3: built-in piecewise templates")
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--num-frames", type=int, default=None,
                   help="use at most this many frames per video")
    g.add_argument("--drop-or-subsample", choices=("drop", "subsample"), default="subsample")
    g.add_argument("--no-shuffle", action="store_true")
    g.add_argument("--synthetic-videos", type=int, default=64,
                   help="embedded default: number of synthetic videos")
    g.add_argument("--synthetic-frames", type=int, default=4,
                   help="embedded default: frames per synthetic video")
    g.add_argument("--synthetic-text-only", action="store_true",
                   help="embedded default: text-only samples (stage 4)")
    g.add_argument("--synthetic-dir", default=None,
                   help="where the embedded default writes its shards (default: a temp dir)")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=5)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=2)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-file", default=None,
                   help="JSON-lines file: one record per iteration")
    g.add_argument("--log-sample-keys", action="store_true",
                   help="also record every iteration's sample keys in --metrics-file")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-GPU peak for MFU (default: by device name, e.g. H100 989)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _err(msg):
    raise ValueError(msg)


def build_model_config(args):
    """The LongVILAConfig of the flags (or of --load's longvila_config.json)."""
    import dataclasses

    from .models.config import get_preset
    cfg = None
    if args.load and not args.override_checkpoint_config:
        from .checkpoint import read_checkpoint_config
        cfg = read_checkpoint_config(args.load)
    if cfg is None:
        cfg = get_preset(args.model, projector_type=args.projector_type, vision=args.vision_model)
    over = {k: v for k, v in dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, rope_base=args.rotary_base,
        max_position_embeddings=args.max_position_embeddings).items() if v is not None}
    if over:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **over))
    return cfg


def validate_args(args, world_size: int):
    """Check the flags against the world size and the model; fill derived values."""
    for name in ("seq_length", "micro_batch_size", "train_iters", "tensor_model_parallel_size",
                 "pipeline_model_parallel_size", "log_interval", "num_workers"):
        v = getattr(args, name)
        if v is None or v < (0 if name == "num_workers" else 1):
            _err(f"--{name.replace('_', '-')} must be >= {0 if name == 'num_workers' else 1}, "
                 f"got {v}")
    if args.pipeline_model_parallel_size != 1:
        _err(f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}: pipeline "
             "parallelism is not supported (LongVILA scales with TP x SP x DP)")
    if args.overlap_grad_reduce and not _cuda():
        _err("--overlap-grad-reduce needs CUDA GPUs (Megatron-Core's DDP overlaps on a CUDA "
             "stream); drop the flag on the CPU")
    if args.bf16 and args.fp16:
        _err("--bf16 and --fp16 are exclusive")
    if args.min_lr > args.lr:
        _err(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    if args.lr_warmup_iters < 0:
        _err(f"--lr-warmup-iters must be >= 0, got {args.lr_warmup_iters}")
    for flag in ("save_interval", "eval_interval"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            _err(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if args.save_interval and not args.save:
        args.save_interval = None  # nothing to save to (e.g. SAVE=none in examples/)

    cfg = build_model_config(args)
    args.model_config = cfg
    tp = args.tensor_model_parallel_size
    resolve_mmsp_arguments(args, world_size, tp=tp, num_heads=cfg.llm.num_attention_heads,
                           num_kv_heads=cfg.llm.num_query_groups,
                           pp=args.pipeline_model_parallel_size)
    cp = args.context_parallel_size
    if cfg.llm.vocab_size % tp:
        _err(f"vocab size {cfg.llm.vocab_size} is not divisible by --tensor-model-parallel-size {tp}")
    if cfg.llm.ffn_hidden_size % tp:
        _err(f"FFN hidden size {cfg.llm.ffn_hidden_size} is not divisible by "
             f"--tensor-model-parallel-size {tp}")
    if cfg.vision.num_attention_heads % tp:
        _err(f"vision attention heads {cfg.vision.num_attention_heads} are not divisible by "
             f"--tensor-model-parallel-size {tp}")
    if args.transformer_impl == "transformer_engine":
        from .models.specs import resolve_transformer_impl
        resolve_transformer_impl(args.transformer_impl)  # not importable: error; else a warning
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron-LM: nothing to split
    if args.sequence_parallel:
        from .models.specs import resolve_transformer_impl
        if resolve_transformer_impl(args.transformer_impl) != "transformer_engine":
            _err("--sequence-parallel needs --transformer-impl transformer_engine (with "
                 "transformer-engine installed, e.g. in the NGC image): Megatron-Core's torch "
                 "norms do not support sequence parallelism")
    dp = world_size // (tp * cp)
    args.world_size, args.data_parallel_size = world_size, dp
    # the sequence must split into 2 x ring x ulysses chunks per sub-sequence layout; the
    # packed row length must at least be a multiple of the layout quantum
    ulysses, ring = cp // args.seq_parallel_ring_size, args.seq_parallel_ring_size
    quantum = (2 * ring if "zigzag" in args.seq_parallel_ring_type and ring > 1 else ring) * ulysses
    if args.sequence_parallel:
        quantum *= tp
    if cp > 1 and (args.seq_length * args.micro_batch_size) % quantum:
        _err(f"--seq-length {args.seq_length} (x micro-batch {args.micro_batch_size}) cannot be "
             f"split by the sequence-parallel layout: it must be a multiple of {quantum} "
             f"(sp {cp} = {ulysses} Ulysses x {ring} ring, {args.seq_parallel_ring_type}"
             f"{', x tp for --sequence-parallel' if args.sequence_parallel else ''})")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        _err(f"--global-batch-size {args.global_batch_size} is not divisible by "
             f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp} "
             f"(= world {world_size} / (tp {tp} x sp {cp}))")
    args.num_micro_batches = args.global_batch_size // (args.micro_batch_size * dp)
    if args.seq_length > cfg.llm.max_position_embeddings:
        _err(f"--seq-length {args.seq_length} exceeds the model's max position embeddings "
             f"{cfg.llm.max_position_embeddings} (raise --max-position-embeddings)")

    # trainable parts
    if args.trainable is None:
        args.trainable = list(STAGE_TRAINABLE[args.stage]) if args.stage else list(TRAINABLE_PARTS)

    # paths
    if args.load is not None:
        from .checkpoint import TRACKER_FILE
        if not os.path.isdir(args.load):
            _err(f"--load {args.load}: no such directory")
        if not os.path.isfile(os.path.join(args.load, TRACKER_FILE)) and not (
                args.save and os.path.abspath(args.save) == os.path.abspath(args.load)):
            _err(f"--load {args.load}: no {TRACKER_FILE} there (no completed checkpoint)")
        if args.ckpt_step is not None:
            from .checkpoint import checkpoint_name
            step_dir = os.path.join(args.load, checkpoint_name(args.ckpt_step))
            if not os.path.isfile(os.path.join(step_dir, "metadata.json")):
                _err(f"--ckpt-step {args.ckpt_step}: no complete checkpoint {step_dir}")
    for flag in ("data_path", "valid_data_path"):
        paths = getattr(args, flag) or []
        for item in paths:
            if _is_number(item):
                continue
            if not (os.path.isdir(item) or is_text_source(item)):
                _err(f"--{flag.replace('_', '-')} {item}: no such shard directory, text corpus "
                     f"(.jsonl/.json/.parquet) or Megatron indexed dataset (PREFIX.bin/.idx)")
    if args.tokenizer_model is None:
        if args.model != "tiny" and args.data_path:
            _err(f"--tokenizer-model is required for model {args.model!r}")
        args.tokenizer_model = "tiny"
    elif args.tokenizer_model != "tiny" and not os.path.exists(args.tokenizer_model):
        _err(f"--tokenizer-model {args.tokenizer_model}: no such file or directory")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters > args.lr_decay_iters:
        _err(f"--lr-warmup-iters {args.lr_warmup_iters} exceeds the decay iterations "
             f"{args.lr_decay_iters} (--lr-decay-iters, default --train-iters)")
    return args


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _is_number(s) -> bool:
    try:
        float(s)
        return True
    except (TypeError, ValueError):
        return False
