"""Full (unsharded) tensors <-> this rank's tensor-parallel shards of a Megatron model.

Megatron-Core marks every tensor-parallel parameter with ``tensor_model_parallel=True`` and
its ``partition_dim``; everything else is replicated. The one irregular case is the fused
SwiGLU fc1 (``cat([gate, up])``), whose shard on rank r is ``cat([gate_r, up_r])``.
"""

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _is_glu_fc1(model, name, param):
    """The language model's fused gate/up projection (the ViT's fc1 is not gated)."""
    return (name.startswith("language_model.") and name.endswith("mlp.linear_fc1.weight")
            and model.language_model.config.gated_linear_unit)


def shard_full_tensor(model, name, param, full):
    tp = parallel_state.get_tensor_model_parallel_world_size()
    r = parallel_state.get_tensor_model_parallel_rank()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if _is_glu_fc1(model, name, param):
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp, 0)[r], torch.chunk(up, tp, 0)[r]], dim=0)
    return torch.chunk(full, tp, dim=dim)[r]


def gather_full_tensor(model, name, param, local):
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return local
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    if _is_glu_fc1(model, name, param):
        halves = [torch.chunk(p, 2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=param.partition_dim)


@torch.no_grad()
def load_full_state_dict(model, full_sd, strict=True):
    """Copy full tensors into this rank's shards. Names must match ``named_parameters``."""
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in full_sd]
    unexpected = [n for n in full_sd if n not in params]
    if strict and (missing or unexpected):
        raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in params.items():
        if name not in full_sd:
            continue
        shard = shard_full_tensor(model, name, p, full_sd[name])
        if shard.shape != p.shape:
            raise ValueError(f"{name}: tensor of shape {tuple(full_sd[name].shape)} gives a shard "
                             f"{tuple(shard.shape)}, the model holds {tuple(p.shape)}")
        p.copy_(shard)


def full_state_dict(model, grads=False):
    """Every parameter (or its gradient) as a full tensor, gathered over the TP group."""
    out = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.data
        if t is None:
            continue
        out[name] = gather_full_tensor(model, name, p, t.detach())
    return out
