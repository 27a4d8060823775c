"""Process setup shared by tools/generate.py and tools/eval_needle.py.

Started plainly, a tool runs as one process (a one-rank gloo world). Started by torchrun with
several ranks, the ranks form the MM-SP (context-parallel) group of size
``--context-parallel-size`` (default: the world size), so a long prompt is prefilled with its
frames and tokens shared across the ranks.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist


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
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", "--seq-parallel-size", dest="context_parallel_size",
                   type=int, default=None, help="SP size (default: world size / TP)")
    g.add_argument("--seq-parallel-ring-size", "--ring-size", dest="ring_size", type=int,
                   default=1)
    g.add_argument("--seq-parallel-ring-type", dest="ring_type", default="zigzag_ring_varlen")
    g.add_argument("--seed", type=int, default=1234, help="weights seed when nothing is loaded")
    return p


def init_distributed():
    """torch.distributed from torchrun's environment, or a one-rank gloo world."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def _checkpoint_config(load_dir: Optional[str]):
    """The LongVILAConfig the trainer saved next to its checkpoints (None if none)."""
    if not load_dir:
        return None
    from ..checkpoint import read_checkpoint_config
    return read_checkpoint_config(load_dir)


def resolve_model_config(args):
    """--model-config JSON, else --model preset, else the checkpoint's config, else tiny."""
    from ..models.config import LongVILAConfig, get_preset
    if args.model_config:
        with open(args.model_config) as f:
            return LongVILAConfig.from_dict(json.load(f))
    if args.model:
        return get_preset(args.model, projector_type=args.projector_type or "mlp_downsample")
    cfg = _checkpoint_config(args.load)
    if cfg is not None:
        return cfg
    return get_preset("tiny", projector_type=args.projector_type or "mlp_downsample")


def _checkpoint_args(load_dir: Optional[str]) -> dict:
    """The trainer's arguments stored in the checkpoint (empty if none / not a training one)."""
    if not load_dir:
        return {}
    try:
        from ..checkpoint import read_common_state
        a = read_common_state(load_dir).get("args")
    except Exception:  # noqa: BLE001 - converted (release) checkpoints may carry no args
        return {}
    return a if isinstance(a, dict) else {}


def resolve_tokenizer(args):
    """--tokenizer, else the training run's --tokenizer-model/--chat-template, else tiny."""
    from ..data.tokenizer import build_tokenizer
    if args.tokenizer:
        return build_tokenizer(args.tokenizer)
    a = _checkpoint_args(args.load)
    return build_tokenizer(a.get("tokenizer_model") or "tiny", template=a.get("chat_template"))


def setup_model(args, cfg=None):
    """Distributed + MM-SP groups + the model (weights loaded from ``args.load`` if given).

    Returns ``(model, cfg)``. The model is in eval mode."""
    from megatron.core import parallel_state
    from .. import cpu_compat
    from ..models import LongVILAModel
    from ..parallel.groups import initialize_mmsp

    init_distributed()
    cfg = cfg or resolve_model_config(args)
    world = dist.get_world_size()
    tp = args.tensor_model_parallel_size
    cp = args.context_parallel_size or world // tp
    if not parallel_state.model_parallel_is_initialized():
        initialize_mmsp(tp=tp, cp=cp, ring=args.ring_size, num_heads=cfg.llm.num_attention_heads,
                        num_kv_heads=cfg.llm.num_query_groups)
    cpu_compat.model_parallel_seed(args.seed)
    model = LongVILAModel(cfg, seq_parallel_ring_type=args.ring_type)
    if torch.cuda.is_available():
        # Megatron-Core's layers are created on the GPU, the plain torch modules (patch
        # embedding, projector) on the host: the whole model goes to the GPU, as in training
        model.cuda(torch.cuda.current_device())
    if args.load:
        load_weights(model, args.load)
    model.eval()
    return model, cfg


def load_weights(model, load_dir: str):
    from ..checkpoint import load_model_weights
    load_model_weights(model, load_dir)


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
