"""Process setup shared by tools/generate.py and tools/eval_needle.py.

Started plainly, a tool runs as one process. Started by torchrun with several ranks, the ranks
form the MM-SP (context-parallel) group given by the trainer's own flags
(``--context-parallel-size`` / ``--seq-parallel-size``, ``--seq-parallel-ring-size`` ...,
checked by the same :class:`~megatron_longvila.config.ParallelConfig`), so a long prompt is
prefilled with its frames and tokens shared across the ranks. Every rank computes the same
answer: TP x SP must use the whole world (no data parallelism here).
"""

from __future__ import annotations

import json
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from .. import cpu_compat, launch
from ..arguments import add_parallel_arguments, parallel_config_from_args
from ..config import ParallelConfig, RunConfig
from ..data.tokenizer import build_tokenizer
from ..models import LongVILAModel
from ..models.config import LongVILAConfig, get_preset
from ..parallel.groups import initialize_mmsp
from .. import checkpoint


def add_model_arguments(p):
    g = p.add_argument_group("model")
    g.add_argument("--load", default=None,
                   help="checkpoint directory (the trainer's --save); none: random weights")
    g.add_argument("--model", default=None,
                   help="model preset (e.g. tiny); default: the checkpoint's config, else tiny")
    g.add_argument("--model-config", default=None, help="a LongVILAConfig JSON file")
    g.add_argument("--projector-type", default=None)
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer name or directory (default: the training run's --tokenizer-model "
                        "stored in the checkpoint, else tiny)")
    g.add_argument("--seed", type=int, default=1234, help="weights seed when nothing is loaded")
    add_parallel_arguments(p)
    return p


def init_distributed():
    """torch.distributed from torchrun's environment, or a one-rank world."""
    launch.init_process_group()


def resolve_model_config(args):
    """--model-config JSON, else --model preset, else the checkpoint's config, else tiny."""
    if args.model_config:
        with open(args.model_config) as f:
            return LongVILAConfig.from_dict(json.load(f))
    if args.model:
        return get_preset(args.model, projector_type=args.projector_type or "mlp_downsample")
    cfg = checkpoint.read_checkpoint_config(args.load) if args.load else None
    if cfg is not None:
        return cfg
    return get_preset("tiny", projector_type=args.projector_type or "mlp_downsample")


def checkpoint_run_config(load_dir: Optional[str]) -> Optional[RunConfig]:
    """The trainer's RunConfig stored in a checkpoint (None for a model-only/converted one)."""
    if not load_dir:
        return None
    try:
        stored = checkpoint.read_common_state(load_dir).get("args")
    except (FileNotFoundError, OSError):  # converted (release) checkpoints carry no run state
        return None
    if stored is None:
        return None
    try:
        return RunConfig.from_dict(stored)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--load {load_dir}: the stored run config cannot be read ({e}); "
                         "pass --tokenizer") from e


def resolve_tokenizer(args):
    """--tokenizer, else the training run's --tokenizer-model/--chat-template, else tiny."""
    if args.tokenizer:
        return build_tokenizer(args.tokenizer)
    run = checkpoint_run_config(args.load)
    if run is None:
        return build_tokenizer("tiny")
    return build_tokenizer(run.data.tokenizer_model or "tiny", template=run.data.chat_template)


def parallel_config(args, cfg: LongVILAConfig) -> ParallelConfig:
    """The tool's TP x SP layout, checked as the trainer checks it; it must fill the world."""
    par = parallel_config_from_args(args).resolve(dist.get_world_size(), cfg)
    if par.data_parallel_size != 1:
        raise ValueError(
            f"{par.world_size} ranks but --tensor-model-parallel-size "
            f"{par.tensor_model_parallel_size} x --context-parallel-size "
            f"{par.context_parallel_size} = {par.world_size // par.data_parallel_size}: the "
            f"ranks would compute the same answers (e.g. --context-parallel-size "
            f"{par.world_size // par.tensor_model_parallel_size})")
    return par


def setup_model(args, cfg=None):
    """Distributed + MM-SP groups + the model (weights loaded from ``args.load`` if given).

    Returns ``(model, cfg)``. The model is in eval mode."""
    init_distributed()
    cfg = cfg or resolve_model_config(args)
    par = parallel_config(args, cfg)
    if not parallel_state.model_parallel_is_initialized():
        initialize_mmsp(tp=par.tensor_model_parallel_size, cp=par.context_parallel_size,
                        ring=par.ring_size, num_heads=cfg.llm.num_attention_heads,
                        num_kv_heads=cfg.llm.num_query_groups)
    cpu_compat.model_parallel_seed(args.seed)
    model = LongVILAModel(cfg, seq_parallel_ring_type=par.ring_type)
    if torch.cuda.is_available():
        # Megatron-Core's layers are created on the GPU, the plain torch modules (patch
        # embedding, projector) on the host: the whole model goes to the GPU, as in training
        model.cuda(torch.cuda.current_device())
    if args.load:
        load_weights(model, args.load)
    model.eval()
    return model, cfg


def load_weights(model, load_dir: str):
    checkpoint.load_model_weights(model, load_dir)


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
