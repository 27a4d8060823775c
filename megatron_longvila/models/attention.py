"""The core-attention module of LongVILA's layer specs.

Megatron-Core's ``SelfAttention`` projects Q/K/V, applies RoPE and then calls the
``core_attention`` submodule with ``query [s, b, heads, d]`` and ``key/value [s, b, kv_heads, d]``
(kv_heads < heads under grouped-query attention); it expects ``[s, b, heads * d]`` back.
This module is that submodule. Packed (document-masked) sequences arrive through
``packed_seq_params`` in ``sbhd`` form: ``cu_seqlens_q`` holds the sub-sequence boundaries of
the (local) token dimension ``s`` (batch is 1 for packed input).

At context-parallel size 1 it runs attention locally: on CUDA (fp16/bf16) one varlen flash
call for the whole packed row (``aten._flash_attention_forward``), elsewhere torch's SDPA per
sub-sequence. At context-parallel size > 1 the sharding code passes
:class:`~megatron_longvila.parallel.sharding.MMSPPackedSeqParams` whose ``mmsp`` context holds
the global layout's attention blocks and groups, and the MM-SP 2D attention of
:mod:`megatron_longvila.kernels.attention` (Ulysses x ring) takes over. The vision tower (config CP size 1, no MM-SP context) always runs
locally: MM-SP splits its frames, not its patches.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ..kernels.attention import attention_2d, ring_attention, varlen_block


def local_attention(q, k, v, causal, scale, cu_seqlens=None):
    """Exact attention over ``q [s, b, h, d]``, ``k/v [s, b, g, d]`` -> ``[s, b, h, d]``.

    With ``cu_seqlens`` (b must be 1) each sub-sequence attends only to itself.
    """
    s, b, h, d = q.shape
    qt, kt, vt = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, heads, s, d]
    gqa = kt.shape[1] != h
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale,
                                             enable_gqa=gqa)
    else:
        assert b == 1, "packed sequences use batch size 1"
        bounds = cu_seqlens.tolist()
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                outs.append(F.scaled_dot_product_attention(
                    qt[..., start:end, :], kt[..., start:end, :], vt[..., start:end, :],
                    is_causal=causal, scale=scale, enable_gqa=gqa))
        out = torch.cat(outs, dim=2)
    return out.permute(2, 0, 1, 3)


class LongVILACoreAttention(MegatronModule):
    """Core attention: causal (language) or full (vision), packed-sequence aware."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.layer_number = layer_number
        d = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else d ** -0.5
        if (config.attention_dropout if attention_dropout is None else attention_dropout) > 0:
            raise ValueError("LongVILA's core attention has no attention dropout (LongVILA trains "
                             "without it); set attention_dropout=0")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None):
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by LongVILACoreAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        cache = getattr(packed_seq_params, "kv_cache", None)
        if cache is not None and cache.decoding:
            # generation: the new tokens against the (SP-sharded) KV cache of their prompts
            s, b = query.shape[:2]
            out = cache.attend(self.layer_number, query[:, 0], key[:, 0], value[:, 0],
                               self.softmax_scale)
            return out.reshape(s, b, -1)
        out = self._attention(query, key, value, causal, packed_seq_params)
        if cache is not None:  # prefill: keep this rank's keys/values
            cache.store_prefill(self.layer_number, key[:, 0], value[:, 0])
        return out

    def _attention(self, query, key, value, causal, packed_seq_params):
        cu = packed_seq_params.cu_seqlens_q if packed_seq_params is not None else None
        mmsp = getattr(packed_seq_params, "mmsp", None)
        if mmsp is not None:
            if not causal:
                raise ValueError("MM-SP 2D attention is causal (language model) only")
            s, b = query.shape[:2]
            assert b == 1, "MM-SP packed sequences use batch size 1"
            out = attention_2d(query[:, 0], key[:, 0], value[:, 0], mmsp.blocks,
                               self.softmax_scale, mmsp.groups)
            return out.reshape(s, b, -1)
        if self.config.context_parallel_size > 1:
            raise ValueError("context-parallel size > 1 needs the MM-SP layout: build the batch "
                             "with megatron_longvila.parallel (LongVILAModel does this)")
        if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[1] == 1:
            s = query.shape[0]
            # one varlen block per micro-batch, shared by all layers (no host sync per layer)
            blk = getattr(packed_seq_params, "_varlen_block", None)
            if blk is None or blk.causal != causal:
                blk = varlen_block([0, s] if cu is None else cu, causal, s)
                if packed_seq_params is not None:
                    packed_seq_params._varlen_block = blk
            out = ring_attention(query[:, 0], key[:, 0], value[:, 0], [blk], self.softmax_scale)
            return out.reshape(s, 1, -1)
        out = local_attention(query, key, value, causal, self.softmax_scale, cu)
        s, b = out.shape[:2]
        return out.reshape(s, b, -1)
