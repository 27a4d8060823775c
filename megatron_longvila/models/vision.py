"""SigLIP vision tower built from Megatron-Core transformer layers (tensor parallel)."""

import torch
import torch.nn as nn
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default

from .config import VisionConfig
from .specs import layer_spec


class SiglipVisionEncoder(MegatronModule):
    """``forward(frames [F, 3, H, W]) -> [F, patches, hidden]``: HF ``hidden_states[select]``.

    All ``num_layers`` blocks and the post-LayerNorm exist (so converters round-trip a released
    tower exactly), but only the first ``layers_used`` run; the rest are frozen, since no
    gradient can reach them.
    """

    def __init__(self, cfg: VisionConfig, tconfig: TransformerConfig, layers_used: int,
                 transformer_impl: str = "local"):
        super().__init__(config=tconfig)
        self.cfg = cfg
        self.layers_used = layers_used
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)
        spec = layer_spec(transformer_impl, "LayerNorm", causal=False)
        self.layers = nn.ModuleList(
            [build_module(spec, config=tconfig, layer_number=i + 1) for i in range(cfg.num_layers)])
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        for layer in list(self.layers[layers_used:]) + [self.post_layernorm]:
            for p in layer.parameters():
                p.requires_grad_(False)
                p.unused_by_forward = True

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Each layer's own (tensor-parallel aware) sharded state dict.

        MegatronModule's default treats the ``nn.ModuleList`` of layers as a plain module whose
        tensors are replicated over TP, which at TP>1 saves only TP rank 0's shards (and loads
        them into every rank). Asking each TransformerLayer shards them correctly.
        """
        tp_group = getattr(self, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
        sd = {}
        for name, child in self.named_children():
            if name == "layers":
                for i, layer in enumerate(child):
                    sd.update(layer.sharded_state_dict(prefix=f"{prefix}layers.{i}.",
                                                       sharded_offsets=sharded_offsets,
                                                       metadata=metadata))
            else:
                sd.update(sharded_state_dict_default(child, f"{prefix}{name}.", sharded_offsets,
                                                     metadata, tp_group=tp_group))
        return sd

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.shape[-1] != self.cfg.image_size or frames.shape[-2] != self.cfg.image_size:
            raise ValueError(f"frames are {tuple(frames.shape[-2:])}, the vision tower expects "
                             f"{self.cfg.image_size}x{self.cfg.image_size}")
        dtype = self.patch_embedding.weight.dtype
        x = self.patch_embedding(frames.to(dtype)).flatten(2).transpose(1, 2)  # [F, P, C]
        x = x + self.position_embedding.weight[None]
        x = x.transpose(0, 1).contiguous()  # Megatron layers take [s, b, h]
        recompute = self.config.recompute_granularity == "full" and self.training
        for layer in self.layers[: self.layers_used]:
            if recompute:
                x = tensor_parallel.checkpoint(lambda h, _l=layer: _l(h, attention_mask=None)[0],
                                               False, x)
            else:
                x, _ = layer(x, attention_mask=None)
        return x.transpose(0, 1)
