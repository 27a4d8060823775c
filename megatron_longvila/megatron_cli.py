"""Megatron-LM's command line on this trainer.

Megatron-LM flags with a meaning here are defined by :mod:`megatron_longvila.arguments` and
mapped onto the :class:`~megatron_longvila.config.RunConfig` there (architecture, training
length in samples, warm-up fraction, optimizer and loss scaling, checkpoint format, ...).
Every *other* flag of Megatron-LM's parser (:data:`megatron_longvila.megatron_lm_flags.FLAGS`)
is recognised by name and refused with one line saying why (:func:`add_refused_flags`), instead
of argparse's generic "unrecognized arguments".
"""

import argparse
from typing import Dict, Tuple

from .megatron_lm_flags import FLAGS

PREFIX = "a Megatron-LM flag this trainer does not support"

# (substring of the flag name, reason): the first match wins
_BY_NAME: Tuple[Tuple[str, str], ...] = (
    ("pipeline", "pipeline parallelism is not supported (LongVILA scales with TP x SP x DP)"),
    ("-per-virtual-", "pipeline parallelism is not supported (LongVILA scales with TP x SP x DP)"),
    ("expert", "mixture-of-experts layers: LongVILA's LLMs (Qwen2, Llama-3) are dense"),
    ("moe", "mixture-of-experts layers: LongVILA's LLMs (Qwen2, Llama-3) are dense"),
    ("mtp", "multi-token prediction is not part of LongVILA"),
    ("fp8", "FP8 training is not supported (bf16, fp16 or fp32)"),
    ("fp4", "FP4 training is not supported (bf16, fp16 or fp32)"),
    ("cuda-graph", "CUDA graphs are not captured by this trainer"),
    ("mamba", "hybrid Mamba models are not LongVILA"),
    ("hybrid", "hybrid Mamba models are not LongVILA"),
    ("lora", "multi-latent attention / LoRA are not part of LongVILA's LLMs"),
    ("multi-latent", "multi-latent attention is not part of LongVILA's LLMs"),
    ("fsdp", "FSDP is not supported: use --use-distributed-optimizer (ZeRO-1)"),
    ("cp-comm", "MM-SP has its own Ulysses x ring attention (--seq-parallel-ring-size, "
                "--seq-parallel-ring-type)"),
    ("hierarchical-context", "MM-SP has its own Ulysses x ring attention"),
    ("inference", "an inference-server option: generation runs through tools/generate.py"),
    ("yaml", "YAML configs are not read: pass the flags"),
    ("retro", "Retro models are not LongVILA"),
    ("wandb", "Weights & Biases takes --wandb-project, --wandb-exp-name, --wandb-save-dir"),
    ("tensorboard", "TensorBoard takes --tensorboard-dir and --tensorboard-log-interval (every "
                    "scalar is written)"),
    ("profile", "profiling is --profile with --profile-step-start/--profile-step-end (torch "
                "profiler, a trace per rank)"),
    ("exit-", "exits are --exit-signal-handler (SIGTERM), --exit-duration-in-mins and "
              "--exit-interval"),
    ("manual-gc", "not supported yet: Python's garbage collector runs as usual"),
    ("recompute", "recompute is --recompute-granularity full (every layer) or selective"),
    ("tokenizer", "the tokenizer is --tokenizer-model: 'tiny', an HF tokenizer directory or a "
                  "sentencepiece model"),
    ("vocab", "the vocabulary comes from the model preset / checkpoint (or --vocab-size)"),
    ("dropout", "LongVILA trains without dropout (only 0.0 is accepted)"),
    ("-fusion", "a Megatron-LM kernel-fusion switch this trainer does not expose"),
    ("init-method", "weights come from a checkpoint or the model's own initialisation"),
)

_BY_GROUP: Dict[str, str] = {
    "rl": "reinforcement-learning training is another Megatron-LM program",
    "biencoder": "biencoder training is another Megatron-LM program",
    "Logits Distillation": "distillation is another Megatron-LM program",
    "vision": "Megatron-LM's vision pretraining (ViT/DINO) is another program: the vision "
              "tower here is SigLIP, set by --model / --vision-model",
    "sft": "Megatron-LM's SFT dataset; SFT here reads conversations from --data-path",
    "In-process restart": "NVIDIA cluster-service integration is not included",
    "ft_package": "NVIDIA cluster-service integration is not included",
    "straggler": "NVIDIA cluster-service integration is not included",
    "one logger": "NVIDIA cluster-service integration is not included",
    "fault injector": "NVIDIA cluster-service integration is not included",
    "workload inspector": "NVIDIA cluster-service integration is not included",
    "opentelemetry": "NVIDIA cluster-service integration is not included",
    "msc": "NVIDIA cluster-service integration is not included",
    "rerun engine": "NVIDIA cluster-service integration is not included",
    "autoresume": "NVIDIA cluster-service integration is not included",
    "experimental": "an experimental Megatron-LM feature",
    "data and dataloader": "Megatron-LM's GPT datasets are not used: data comes from WebDataset "
                           "shards and text corpora given by --data-path",
    "checkpointing": "checkpoints are torch_dist in Megatron-LM's directory layout, saved "
                     "synchronously with optimizer, RNG and loader state",
    "distributed init": "the process group comes from torchrun's environment (NCCL on GPUs, "
                        "gloo on CPUs)",
    "logging": "a Megatron-LM logging option this trainer does not expose (see --help, "
               "logging)",
    "mixed precision": "precision is --bf16, --fp16 or fp32 with Megatron-Core's defaults",
    "Transformer-Engine": "transformer-engine options are not exposed (--transformer-impl)",
}


def refusal_reason(flag: str, group: str) -> str:
    """Why ``flag`` (of Megatron-LM's argument group ``group``) is refused."""
    for part, reason in _BY_NAME:
        if part in flag:
            return reason
    return _BY_GROUP.get(group, f"a Megatron-LM {group} option this trainer does not expose "
                                "(LongVILA builds its model from --model presets and the "
                                "architecture flags it lists in --help)")


class UnsupportedFlagError(ValueError):
    """A Megatron-LM flag this trainer refuses (the message is one line)."""


class _Refuse(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        raise UnsupportedFlagError(f"{option_string}: {PREFIX}: "
                                   f"{refusal_reason(option_string, FLAGS[option_string])}")


def add_refused_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Recognise every Megatron-LM flag ``parser`` does not define; using one raises
    :class:`UnsupportedFlagError` naming it and the reason (hidden from ``--help``)."""
    have = {opt for action in parser._actions for opt in action.option_strings}
    for flag in FLAGS:
        if flag not in have:
            parser.add_argument(flag, nargs="*", action=_Refuse, help=argparse.SUPPRESS)
    return parser


def supported_flags(parser: argparse.ArgumentParser):
    """The Megatron-LM flags ``parser`` defines itself (given their Megatron-LM meaning)."""
    return sorted(opt for action in parser._actions for opt in action.option_strings
                  if opt in FLAGS and not isinstance(action, _Refuse))
