"""Where each Megatron parameter lives in a dist checkpoint (key, stacked layer axis), read off
Megatron-Core itself: used by the streaming writer and by the Megatron checkpoint reader."""

import dataclasses

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from .. import cpu_compat
from ..checkpoint import sharded_metadata
from ..models import LongVILAModel
from ..models.config import LongVILAConfig


def twin_config(cfg: LongVILAConfig) -> LongVILAConfig:
    """The same structure (layers, heads, groups, biases, tying, projector) with tiny sizes."""
    l, v = cfg.llm, cfg.vision
    llm = dataclasses.replace(l, vocab_size=8, hidden_size=2 * l.num_attention_heads,
                              ffn_hidden_size=2)
    vis = dataclasses.replace(v, hidden_size=2 * v.num_attention_heads, intermediate_size=2,
                              image_size=2, patch_size=1)
    return dataclasses.replace(cfg, llm=llm, vision=vis)


def sharded_key_index(cfg: LongVILAConfig, return_state_dict: bool = False):
    """Megatron parameter name -> (dist-checkpoint key, prepended axes, layer index).

    Read off the sharded state dict of a tiny model of the same structure (so keys such as
    ``decoder.layers.self_attention.linear_qkv.layer_norm_weight`` and the stacked layer axis
    come from Megatron-Core itself, not from a copy of its rules). Needs a 1-rank TP state.
    """
    state = torch.get_rng_state()
    cpu_compat.model_parallel_seed(0)
    twin = LongVILAModel(twin_config(cfg))
    torch.set_rng_state(state)
    params = dict(twin.named_parameters())
    by_ptr = {}
    for n, p in params.items():
        by_ptr.setdefault(p.data_ptr(), []).append(n)
    sd = twin.sharded_state_dict(metadata=sharded_metadata())
    index = {}
    for v in nested_values(sd):
        if not isinstance(v, (ShardedTensor, ShardedTensorFactory)) or v.data is None:
            continue
        names = by_ptr.get(v.data.data_ptr(), [])
        if len(names) != 1:
            continue
        name = names[0]
        if isinstance(v, ShardedTensorFactory):
            entry = (v.key, None, None)
        else:
            pre = v.prepend_axis_num
            entry = (v.key, pre, v.global_offset[0] if pre else None)
        if name in index and index[name] != entry:
            # The same tensor under two keys (e.g. a tied output layer): keep the one
            # named after the parameter itself.
            if not entry[0].endswith(name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]):
                continue
        index[name] = entry
    # Factories (the fused SwiGLU fc1): stacked like their siblings in the same block.
    for name, (key, pre, layer) in list(index.items()):
        if pre is None:
            sib = [(k, pr, ly) for n, (k, pr, ly) in index.items()
                   if pr is not None and n.rsplit(".mlp.", 1)[0] == name.rsplit(".mlp.", 1)[0]]
            if not sib:
                raise RuntimeError(f"cannot place the sharded factory of {name}")
            index[name] = (key, sib[0][1], sib[0][2])
    missing = [n for n in params if n not in index]
    if missing:
        raise RuntimeError(f"no dist-checkpoint key for {missing[:5]}")
    return (index, sd) if return_state_dict else index

