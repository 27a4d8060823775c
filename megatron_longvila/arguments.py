"""Command-line flags of ``pretrain_longvila.py``: Megatron-LM's names where Megatron has the
concept, LongVILA's where it does not. This module only maps argv to the typed
:class:`~megatron_longvila.config.RunConfig`; the checks live with each section
(:func:`~megatron_longvila.config.resolve_run_config`).

    cfg = run_config_from_argv(argv, world_size)   # parse + map + check, errors naming numbers

The parallel flags (both MM-SP spellings) are shared with the evaluation tools through
:func:`add_parallel_arguments` / :func:`parallel_config_from_args`.
"""

import argparse
from typing import List, Optional

from .config import (STAGES, TRAINABLE_PARTS, CheckpointConfig, DataConfig, DebugConfig,
                     LoggingConfig, ModelConfig, OptimizerConfig, ParallelConfig, RunConfig,
                     TrainingConfig, resolve_run_config)
from .megatron_cli import UnsupportedFlagError, add_refused_flags
from .parallel.groups import add_mmsp_arguments, reconcile_mmsp_flags

__all__ = ["UnsupportedFlagError", "add_parallel_arguments", "build_parser", "config_from_args",
           "parallel_config_from_args", "parse_args", "run_config_from_argv"]


def add_parallel_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """TP / SP flags, Megatron's and LongVILA's spellings (the trainer's and the tools')."""
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=None,
                   help="MM-SP size (= --seq-parallel-size)")
    g.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs="+", default=None,
                   help="ULYSSES RING (= --seq-parallel-ring-size RING)")
    add_mmsp_arguments(p)
    return p


def parallel_config_from_args(ns: argparse.Namespace) -> ParallelConfig:
    """The (unchecked) ParallelConfig of the flags of :func:`add_parallel_arguments` (and the
    trainer's other parallel flags where present)."""
    cp, ring = reconcile_mmsp_flags(ns.context_parallel_size, ns.seq_parallel_size,
                                    ns.hierarchical_context_parallel_sizes,
                                    ns.seq_parallel_ring_size)
    extra = {k: getattr(ns, k) for k in (
        "pipeline_model_parallel_size", "sequence_parallel", "use_distributed_optimizer",
        "overlap_grad_reduce", "distributed_backend", "distributed_timeout_minutes")
        if k in vars(ns)}
    return ParallelConfig(tensor_model_parallel_size=ns.tensor_model_parallel_size,
                          context_parallel_size=cp, ring_size=ring,
                          ring_type=ns.seq_parallel_ring_type, **extra)


class DefaultsOnceFormatter(argparse.HelpFormatter):
    """Each flag's default said once: appended unless the help text already says it, and not
    for switches (off by default) or flags without one."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = action.default
        if (d is None or d is False or d is argparse.SUPPRESS or "default" in h
                or action.nargs == 0):
            return h
        return f"{h} (default: %(default)s)" if h else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_longvila.py",
        description="LongVILA training on Megatron-Core. With no --data-path, a tiny model "
                    "trains on synthetic videos made on the fly.",
        formatter_class=DefaultsOnceFormatter, allow_abbrev=False)

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="model preset: tiny, qwen2-1.5b, qwen2-7b, llama3-8b (default: the "
                        "--load checkpoint's architecture, else tiny); with --load holding "
                        "longvila_config.json the preset must match it, unless "
                        "--override-checkpoint-config")
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
    # Megatron-LM's architecture flags with their meaning (the preset gives what they leave out)
    g.add_argument("--normalization", choices=("RMSNorm", "LayerNorm"), default=None,
                   help="RMSNorm only (LongVILA's LLMs); LayerNorm is refused")
    g.add_argument("--norm-epsilon", type=float, default=None, help="RMSNorm epsilon")
    g.add_argument("--swiglu", action="store_true",
                   help="accepted: the MLP is SwiGLU (Qwen2 / Llama-3)")
    g.add_argument("--disable-bias-linear", action="store_true",
                   help="accepted: no linear layer has a bias (except --add-qkv-bias)")
    g.add_argument("--add-qkv-bias", action="store_true", default=None,
                   help="biases on the QKV projection (Qwen2)")
    g.add_argument("--group-query-attention", action="store_true",
                   help="accepted: grouped-query attention with --num-query-groups groups")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None,
                   help="separate output layer (default: the preset's)")
    g.add_argument("--position-embedding-type", choices=("rope", "learned_absolute", "none"),
                   default=None, help="rope only")
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="accepted: RoPE (Megatron-LM's older spelling)")
    g.add_argument("--rotary-percent", type=float, default=1.0, help="1.0 only")
    g.add_argument("--kv-channels", type=int, default=None,
                   help="must equal --hidden-size / --num-attention-heads")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="the LLM's vocabulary, padded as Megatron-LM pads it "
                        "(--make-vocab-size-divisible-by x TP)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--attention-dropout", type=float, default=0.0, help="0.0 only")
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="0.0 only")
    g.add_argument("--use-mcore-models", action="store_true",
                   help="accepted: the model is always Megatron-Core's")

    add_parallel_arguments(p)
    g = p.add_argument_group("distributed")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="only 1 is supported (LongVILA uses TP x SP x DP)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron's tensor-parallel sequence parallelism (norms/dropout)")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--distributed-backend", choices=("auto", "nccl", "gloo"), default="auto")
    g.add_argument("--distributed-timeout-minutes", type=int, default=30)

    g = p.add_argument_group("training")
    g.add_argument("--stage", choices=STAGES, default=None,
                   help="LongVILA stage: sets the trainable parts (see --trainable)")
    g.add_argument("--trainable", nargs="+", choices=TRAINABLE_PARTS, default=None,
                   help="parts to train (default: the stage's, else all)")
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro-batch size x data-parallel size")
    g.add_argument("--train-iters", type=int, default=None,
                   help="default 100 (or from --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="training length in samples: ceil(samples / global batch) iterations; "
                        "the learning-rate schedule then counts samples (as Megatron-LM)")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="accepted: the loss is always the mean over the global batch's tokens")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"))
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="with --train-samples (default: --train-samples)")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="with --train-samples")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm-up as a fraction of the decay length")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="with --train-samples")
    g.add_argument("--start-weight-decay", type=float, default=None,
                   help="default: --weight-decay")
    g.add_argument("--end-weight-decay", type=float, default=None,
                   help="default: --weight-decay")
    g.add_argument("--weight-decay-incr-style", choices=("constant", "linear", "cosine"),
                   default="constant")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--loss-scale", type=float, default=None,
                   help="fp16: a static loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 16,
                   help="fp16 dynamic loss scale start (Megatron-LM's default is 2^32)")
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=float, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)
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
                   help="with --on-nan skip: stop after this many skipped iterations; also the "
                        "number of iterations without a single label token tolerated")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--ckpt-format", choices=("torch_dist",), default="torch_dist",
                   help="Megatron-Core dist checkpointing (the only format written and read)")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="accepted: the architecture is --load's own unless "
                        "--override-checkpoint-config")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="stop if --load holds no checkpoint (default: start from scratch)")
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
    g.add_argument("--skip-bad-samples", type=int, default=0, metavar="N",
                   help="skip up to N unusable samples per data-loading process (each named "
                        "and counted in the log and the metrics); default 0: stop at the first")
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
    add_cluster_and_logging_arguments(p)
    add_refused_flags(p)
    for action in p._actions:  # help text for the flags defined without one
        if action.help is None and action.option_strings:
            action.help = FLAG_HELP.get(action.option_strings[0])
    return p


# Help of the flags defined above without a help= (kept here, one hunk, Megatron-LM's meaning)
FLAG_HELP = {
    "--projector-type": "vision-to-LLM projector (LongVILA: mlp_downsample, 2x2 token merge)",
    "--num-layers": "transformer layers of the LLM (overrides the preset)",
    "--hidden-size": "LLM hidden size (overrides the preset)",
    "--ffn-hidden-size": "LLM MLP hidden size (overrides the preset)",
    "--num-attention-heads": "LLM attention heads (overrides the preset)",
    "--num-query-groups": "LLM KV heads for grouped-query attention (overrides the preset)",
    "--max-position-embeddings": "longest sequence the RoPE positions cover (overrides the "
                                 "preset)",
    "--recompute-granularity": "activation recompute: full (every layer) or selective "
                               "(attention core); none when not given",
    "--make-vocab-size-divisible-by": "pad the vocabulary to a multiple of this (times TP)",
    "--tensor-model-parallel-size": "tensor-parallel size (TP)",
    "--seq-parallel-ring-type": "ring attention variant of MM-SP's ring part",
    "--use-distributed-optimizer": "Megatron-Core's distributed optimizer (optimizer state "
                                   "sharded over data-parallel ranks)",
    "--overlap-grad-reduce": "overlap the gradient all-reduce with the backward (CUDA only)",
    "--distributed-backend": "auto: NCCL with CUDA, gloo otherwise",
    "--distributed-timeout-minutes": "timeout of collective operations",
    "--seq-length": "tokens per packed row (after frames are expanded)",
    "--micro-batch-size": "rows per micro-batch per data-parallel rank",
    "--lr": "peak learning rate",
    "--min-lr": "learning rate at the end of the decay",
    "--lr-decay-style": "learning-rate decay after the warm-up",
    "--lr-warmup-iters": "iterations of linear warm-up from --lr-warmup-init",
    "--lr-warmup-init": "learning rate at the start of the warm-up",
    "--lr-wsd-decay-iters": "WSD style: iterations of the final decay",
    "--weight-decay-incr-style": "how weight decay moves from --start- to --end-weight-decay",
    "--optimizer": "adam (AdamW) or sgd",
    "--sgd-momentum": "momentum of --optimizer sgd",
    "--min-loss-scale": "fp16: the dynamic loss scale's floor",
    "--loss-scale-window": "fp16: iterations without overflow before the scale grows",
    "--hysteresis": "fp16: overflows tolerated before the scale shrinks",
    "--weight-decay": "AdamW weight decay",
    "--adam-beta1": "Adam beta1",
    "--adam-beta2": "Adam beta2",
    "--adam-eps": "Adam epsilon",
    "--clip-grad": "clip the global gradient norm to this (0: no clipping)",
    "--bf16": "bf16 mixed precision (fp32 main weights and gradients)",
    "--fp16": "fp16 mixed precision with dynamic loss scaling",
    "--seed": "seed of the weights' initialisation and the data order",
    "--save": "checkpoint directory to save to (Megatron-LM's layout)",
    "--load": "checkpoint directory to resume (or, with --finetune, start) from",
    "--save-interval": "save every this many iterations (and at the end)",
    "--no-load-optim": "resume without the optimizer state",
    "--no-load-rng": "resume without the RNG state",
    "--keep-last-checkpoints": "keep only this many newest iter_* directories",
    "--valid-data-path": "validation data (as --data-path); default: --data-path",
    "--num-workers": "loader worker processes per rank (0: in the trainer process)",
    "--drop-or-subsample": "a video too long for --seq-length: drop it or keep fewer frames",
    "--no-shuffle": "read the samples in order",
    "--log-interval": "print Megatron-LM's log line every this many iterations",
    "--eval-interval": "run validation every this many iterations (none when not given)",
    "--eval-iters": "global batches per validation",
    "--tensorboard-dir": "write TensorBoard scalars (Megatron-LM's tag names) here; needs "
                         "the tensorboard package (the 'logging' extra)",
}


def add_cluster_and_logging_arguments(p: argparse.ArgumentParser):
    """Megatron-LM's exit flags (cluster habits) and logging/profiling flags, Megatron's names
    and meanings (issue 15 items 3-4)."""
    g = p.add_argument_group("exit (cluster habits)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (Slurm's time limit, scancel): finish the current step, "
                        "save to --save, exit 0")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit 0 once the run has trained this many minutes")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit 0 after the iteration divisible by this value")
    g = p.add_argument_group("logging (Megatron-LM's)")
    for flag in ("--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
                 "--log-world-size-to-tensorboard"):
        g.add_argument(flag, action="store_true",
                       help="accepted for Megatron-LM command lines: always written here")
    g.add_argument("--tensorboard-log-interval", type=int, default=1,
                   help="write TensorBoard / W&B scalars every this many iterations")
    g.add_argument("--wandb-project", default=None,
                   help="Weights & Biases project: log the scalars there too "
                        "(WANDB_MODE=offline works without network)")
    g.add_argument("--wandb-exp-name", default=None, help="W&B run name")
    g.add_argument("--wandb-save-dir", default=None,
                   help="W&B run directory (default: --save/wandb, else ./wandb)")
    g.add_argument("--log-throughput", action="store_true",
                   help="TFLOP/s per GPU in the log line and the 'throughput' tag")
    g.add_argument("--log-params-norm", action="store_true",
                   help="the parameters' L2 norm in the log line and the 'params-norm' tag")
    g.add_argument("--timing-log-level", type=int, choices=(0, 1, 2), default=0,
                   help="0: iteration time only; 1/2: also the step's phases (forward-backward, "
                        "optimizer) in the log line")
    g.add_argument("--profile", action="store_true",
                   help="torch profiler over iterations [--profile-step-start, "
                        "--profile-step-end); traces to --tensorboard-dir (else ./profile)")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="accepted for Megatron-LM command lines: --profile always uses the "
                        "torch profiler here")
    g.add_argument("--profile-step-start", type=int, default=10,
                   help="first profiled iteration")
    g.add_argument("--profile-step-end", type=int, default=12,
                   help="profiling stops before this iteration")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _check_megatron_values(ns: argparse.Namespace):
    """Megatron-LM flags accepted only with the value this trainer implements."""
    fixed = [("--normalization", ns.normalization, (None, "RMSNorm"),
              "LongVILA's LLMs use RMSNorm"),
             ("--position-embedding-type", ns.position_embedding_type, (None, "rope"),
              "LongVILA's LLMs use RoPE"),
             ("--rotary-percent", ns.rotary_percent, (1.0,), "RoPE rotates every channel"),
             ("--attention-dropout", ns.attention_dropout, (0.0,), "LongVILA trains without dropout"),
             ("--hidden-dropout", ns.hidden_dropout, (0.0,), "LongVILA trains without dropout")]
    for flag, value, ok, why in fixed:
        if value not in ok:
            raise UnsupportedFlagError(f"{flag} {value}: not supported ({why}); accepted: "
                                       f"{', '.join(str(v) for v in ok if v is not None)}")
    if ns.train_samples is not None and ns.train_iters is not None:
        raise ValueError("--train-samples and --train-iters are exclusive")
    if ns.lr_warmup_fraction is not None and (ns.lr_warmup_iters or ns.lr_warmup_samples):
        raise ValueError("--lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples are "
                         "exclusive")
    if ns.train_samples is None and (ns.lr_decay_samples is not None or ns.lr_warmup_samples
                                     or ns.lr_wsd_decay_samples is not None):
        raise ValueError("--lr-decay-samples/--lr-warmup-samples/--lr-wsd-decay-samples need "
                         "--train-samples (use the -iters flags otherwise)")
    if ns.train_samples is not None and (ns.lr_decay_iters is not None or ns.lr_warmup_iters
                                         or ns.lr_wsd_decay_iters is not None):
        raise ValueError("with --train-samples the schedule is given in samples "
                         "(--lr-decay-samples, --lr-warmup-samples, --lr-wsd-decay-samples)")


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """Map parsed flags onto the (unchecked) RunConfig; nothing else."""
    if ns.bf16 and ns.fp16:
        raise ValueError("--bf16 and --fp16 are exclusive")
    _check_megatron_values(ns)
    return RunConfig(
        model=ModelConfig(
            name=ns.model, vision_model=ns.vision_model, projector_type=ns.projector_type,
            num_layers=ns.num_layers, hidden_size=ns.hidden_size,
            ffn_hidden_size=ns.ffn_hidden_size, num_attention_heads=ns.num_attention_heads,
            num_query_groups=ns.num_query_groups, rotary_base=ns.rotary_base,
            max_position_embeddings=ns.max_position_embeddings,
            norm_epsilon=ns.norm_epsilon, add_qkv_bias=ns.add_qkv_bias,
            untie_embeddings_and_output_weights=ns.untie_embeddings_and_output_weights,
            vocab_size=ns.vocab_size,
            make_vocab_size_divisible_by=ns.make_vocab_size_divisible_by,
            kv_channels=ns.kv_channels,
            override_checkpoint_config=ns.override_checkpoint_config,
            transformer_impl=ns.transformer_impl, recompute_granularity=ns.recompute_granularity,
            precision="bf16" if ns.bf16 else "fp16" if ns.fp16 else "fp32"),
        parallel=parallel_config_from_args(ns),
        data=DataConfig(
            data_path=ns.data_path, valid_data_path=ns.valid_data_path,
            tokenizer_model=ns.tokenizer_model, chat_template=ns.chat_template,
            num_workers=ns.num_workers, num_frames=ns.num_frames,
            drop_or_subsample=ns.drop_or_subsample, shuffle=not ns.no_shuffle,
            skip_bad_samples=ns.skip_bad_samples,
            synthetic_videos=ns.synthetic_videos, synthetic_frames=ns.synthetic_frames,
            synthetic_text_only=ns.synthetic_text_only, synthetic_dir=ns.synthetic_dir),
        training=TrainingConfig(
            stage=ns.stage, trainable=ns.trainable, seq_length=ns.seq_length,
            micro_batch_size=ns.micro_batch_size, global_batch_size=ns.global_batch_size,
            train_iters=ns.train_iters, train_samples=ns.train_samples, seed=ns.seed, on_nan=ns.on_nan,
            max_skipped_iters=ns.max_skipped_iters, exit_signal_handler=ns.exit_signal_handler,
            exit_duration_in_mins=ns.exit_duration_in_mins, exit_interval=ns.exit_interval),
        optimizer=OptimizerConfig(
            lr=ns.lr, min_lr=ns.min_lr, lr_decay_style=ns.lr_decay_style,
            lr_decay_iters=ns.lr_decay_iters, lr_warmup_iters=ns.lr_warmup_iters,
            lr_warmup_init=ns.lr_warmup_init, lr_wsd_decay_iters=ns.lr_wsd_decay_iters,
            weight_decay=ns.weight_decay, adam_beta1=ns.adam_beta1, adam_beta2=ns.adam_beta2,
            adam_eps=ns.adam_eps, clip_grad=ns.clip_grad, lr_decay_samples=ns.lr_decay_samples,
            lr_warmup_samples=ns.lr_warmup_samples, lr_warmup_fraction=ns.lr_warmup_fraction,
            lr_wsd_decay_samples=ns.lr_wsd_decay_samples,
            start_weight_decay=ns.start_weight_decay, end_weight_decay=ns.end_weight_decay,
            weight_decay_incr_style=ns.weight_decay_incr_style, optimizer=ns.optimizer,
            sgd_momentum=ns.sgd_momentum, loss_scale=ns.loss_scale,
            initial_loss_scale=ns.initial_loss_scale, min_loss_scale=ns.min_loss_scale,
            loss_scale_window=ns.loss_scale_window, hysteresis=ns.hysteresis),
        checkpoint=CheckpointConfig(
            save=ns.save, load=ns.load, save_interval=ns.save_interval, finetune=ns.finetune,
            ckpt_step=ns.ckpt_step, load_optim=not ns.no_load_optim,
            load_rng=not ns.no_load_rng, load_loader_state=not ns.no_load_loader_state,
            keep_last_checkpoints=ns.keep_last_checkpoints,
            optim_fully_reshardable=ns.dist_ckpt_optim_fully_reshardable,
            exit_on_missing_checkpoint=ns.exit_on_missing_checkpoint),
        logging=LoggingConfig(
            log_interval=ns.log_interval, eval_interval=ns.eval_interval,
            eval_iters=ns.eval_iters, tensorboard_dir=ns.tensorboard_dir,
            metrics_file=ns.metrics_file, log_sample_keys=ns.log_sample_keys,
            peak_tflops=ns.peak_tflops, tensorboard_log_interval=ns.tensorboard_log_interval,
            wandb_project=ns.wandb_project, wandb_exp_name=ns.wandb_exp_name,
            wandb_save_dir=ns.wandb_save_dir, log_throughput=ns.log_throughput,
            log_params_norm=ns.log_params_norm, timing_log_level=ns.timing_log_level,
            profile=ns.profile, profile_step_start=ns.profile_step_start,
            profile_step_end=ns.profile_step_end),
        debug=DebugConfig(
            kill_after_iteration=ns.debug_kill_after_iteration,
            kill_during_save=ns.debug_kill_during_save,
            nan_at_iteration=ns.debug_nan_at_iteration))


def run_config_from_argv(argv: Optional[List[str]], world_size: int) -> RunConfig:
    """Parse, map and check: the resolved RunConfig of a command line for ``world_size``
    processes. Bad values raise ``ValueError`` naming the flag and the numbers."""
    return resolve_run_config(config_from_args(parse_args(argv)), world_size)
