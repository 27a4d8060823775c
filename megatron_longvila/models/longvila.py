"""LongVILAModel: SigLIP tower + VILA projector + Megatron-Core GPTModel.

One micro-batch is a packed row (see ``megatron_longvila.data``): ``tokens [1, S]`` with
``IMAGE_TOKEN_INDEX`` at visual positions (``tokens_per_frame`` per frame, frames in order),
``position_ids [1, S]`` restarting per sample, ``cu_seqlens`` marking the samples, and
``frames [F, 3, H, W]``. Unpacked input (``tokens [b, s]``, ``cu_seqlens=None``) also works.

The forward has one path for every layout: :func:`~megatron_longvila.parallel.sharding.
shard_micro_batch` plans this rank's share (SP=1: the whole batch; SP>1: the MM-SP token
shard, frame range and route), then encode -> merge -> decode -> output run on that share.
It returns a :class:`LongVILAOutput`: the output rows of this rank and what the loss and the
gathering of outputs need (the rows' loss mask and input positions), as Megatron's LLaVA
returns ``(output, loss_mask)``. Nothing is left on the model.
"""

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..parallel.groups import get_mmsp_groups
from ..parallel.sharding import BatchShard, MMSPPackedSeqParams, shard_micro_batch
from .config import LongVILAConfig
from .kv_cache import KVCache, rows_per_prompt
from .projector import MultimodalProjector
from .specs import (layer_spec, llm_transformer_config, resolve_transformer_impl,
                    vision_transformer_config)
from .vision import SiglipVisionEncoder


def rope_frequencies(position_ids: torch.Tensor, dim: int, base: float) -> torch.Tensor:
    """Per-token RoPE angles ``[s, b, 1, dim]`` (fp32) for Megatron's ``apply_rotary_pos_emb``.

    Computed from the true position of every token, so packed rows (positions restart per
    sample) and sequence-sharded rows (positions are global) rotate correctly.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                            device=position_ids.device) / dim))
    angles = position_ids.t().float()[..., None] * inv_freq  # [s, b, dim/2]
    return torch.cat([angles, angles], dim=-1)[:, :, None, :]


@dataclass
class LongVILAOutput:
    """What :meth:`LongVILAModel.forward` returns (this rank's rows; SP=1: all rows).

    ``output``: per-token losses ``[b, s]`` in fp32 (0 where there is no label) when labels
    were given, else logits ``[b, s, V]`` (vocabulary-sharded under TP if parallel_output).
    ``loss_mask``: ``[b, s]`` bool, the rows holding a label (None without labels): the loss is
    ``sum(output * loss_mask)`` over the SP group / the group's label count
    (:func:`~megatron_longvila.parallel.sharding.sp_loss`).
    ``row_index``: ``[b, s]`` the input-row position of each output row (``-1`` at layout
    padding), for :func:`~megatron_longvila.parallel.sharding.select_rows` /
    :func:`~megatron_longvila.parallel.sharding.gather_sequence`.
    """
    output: torch.Tensor
    loss_mask: Optional[torch.Tensor]
    row_index: torch.Tensor


class LongVILAModel(MegatronModule):
    def __init__(self, config: LongVILAConfig, dtype=torch.float32, transformer_impl="local",
                 sequence_parallel=False, recompute=None,
                 seq_parallel_ring_type: str = "zigzag_ring_varlen"):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        cp = parallel_state.get_context_parallel_world_size()
        impl = resolve_transformer_impl(transformer_impl)
        llm_cfg = config.llm
        if llm_cfg.vocab_size % tp:
            raise ValueError(f"vocab size {llm_cfg.vocab_size} is not divisible by the tensor "
                             f"parallel size {tp}")
        tconfig = llm_transformer_config(llm_cfg, dtype, tp, sequence_parallel, cp, recompute)
        super().__init__(config=tconfig)
        self.cfg = config
        self.transformer_impl = impl
        # MM-SP (context-parallel size > 1): token layout of the ring; see parallel/layout.py
        self.seq_parallel_ring_type = seq_parallel_ring_type
        self.vision_model = SiglipVisionEncoder(
            config.vision, vision_transformer_config(config.vision, dtype, tp, recompute),
            config.vision_layers_used, impl)
        self.projector = MultimodalProjector(config.projector_type, config.vision.hidden_size,
                                             llm_cfg.hidden_size, config.projector_token_order)
        self.language_model = GPTModel(
            config=tconfig,
            transformer_layer_spec=layer_spec(impl, "RMSNorm", causal=True),
            vocab_size=llm_cfg.vocab_size,
            max_sequence_length=llm_cfg.max_position_embeddings,
            pre_process=True, post_process=True,
            share_embeddings_and_output_weights=llm_cfg.tie_word_embeddings,
            position_embedding_type="rope", rotary_base=llm_cfg.rope_base,
        )
        if dtype != torch.float32:
            self.vision_model.to(dtype)
            self.projector.to(dtype)

    # ------------------------------------------------------------------ pieces
    def set_trainable(self, vision: bool = True, projector: bool = True, llm: bool = True):
        """Freeze controls for the five stages (frozen parts get no gradient)."""
        for module, flag in ((self.vision_model, vision), (self.projector, projector),
                             (self.language_model, llm)):
            for p in module.parameters():
                p.requires_grad_(flag and not getattr(p, "unused_by_forward", False))

    @property
    def tokens_per_frame(self) -> int:
        return self.cfg.tokens_per_frame

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """``[F, 3, H, W] -> [F, tokens_per_frame, llm_hidden]``."""
        return self.projector(self.vision_model(frames))

    def embed(self, tokens: torch.Tensor, visual: Optional[torch.Tensor]) -> torch.Tensor:
        """Text embeddings with each placeholder run replaced by its frame's visual tokens.

        ``tokens [b, s]``, ``visual [n_visual_tokens, h]`` in placeholder order -> ``[s, b, h]``.
        """
        is_visual = tokens == IMAGE_TOKEN_INDEX
        n_slots = int(is_visual.sum())
        n_visual = 0 if visual is None else visual.shape[0]
        if n_slots != n_visual:
            raise ValueError(f"the tokens hold {n_slots} visual placeholder positions but the "
                             f"frames give {n_visual} visual tokens "
                             f"({self.tokens_per_frame} per frame)")
        emb = self.language_model.embedding.word_embeddings(tokens.masked_fill(is_visual, 0))
        if n_visual:
            emb = emb.masked_scatter(is_visual[..., None], visual.to(emb.dtype))
        elif visual is not None and visual.requires_grad:
            # MM-SP: this rank's token shard holds no placeholder, but its (empty) routed
            # embeddings must stay in the graph: the route's backward all-to-all is collective,
            # and the ranks that encoded frames wait in it for this rank.
            emb = emb + visual.sum().to(emb.dtype)
        return emb.transpose(0, 1).contiguous()

    def decode(self, hidden: torch.Tensor, position_ids: torch.Tensor,
               packed_seq_params: Optional[PackedSeqParams]) -> torch.Tensor:
        """Decoder stack (+ final norm) on ``[s, b, h]``; returns ``[s, b, h]``."""
        rope = rope_frequencies(position_ids, self.cfg.llm.kv_channels, self.cfg.llm.rope_base)
        if self.config.sequence_parallel:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden)
        return self.language_model.decoder(hidden_states=hidden, attention_mask=None,
                                           rotary_pos_emb=rope, packed_seq_params=packed_seq_params)

    def output(self, hidden: torch.Tensor, labels: Optional[torch.Tensor],
               parallel_output: bool = True) -> torch.Tensor:
        """Logits ``[b, s, V]`` (vocab-sharded under TP if parallel_output) or, with labels,
        per-token losses ``[b, s]`` in fp32 (0 where the label is IGNORE_INDEX)."""
        lm = self.language_model
        weight = lm.shared_embedding_or_output_weight() if lm.share_embeddings_and_output_weights else None
        if labels is not None and not self.config.sequence_parallel:
            # (under Megatron's sequence parallelism the output layer gathers the sequence
            # itself, so rows cannot be picked before it; that path computes every row)
            return self._output_losses_on_labelled(hidden, labels, weight)
        logits, _ = lm.output_layer(hidden, weight=weight)  # [s, b, V/tp]
        if labels is None:
            if not parallel_output:
                logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
            return logits.transpose(0, 1).contiguous()
        target = labels.t()
        valid = target != IGNORE_INDEX
        losses = tensor_parallel.vocab_parallel_cross_entropy(
            logits.float(), target.masked_fill(~valid, 0).contiguous())
        return (losses * valid).t().contiguous()

    def _output_losses_on_labelled(self, hidden, labels, weight):
        """Per-token losses computing the output layer only where a label exists.

        In a video row most positions are visual tokens or prompt without a label; their
        logits (``s x vocab`` in fp32: 20 GB at 32k tokens and a 152k vocabulary) would only be
        thrown away. One index (a single host sync per micro-batch) picks the labelled rows.
        """
        s, b, h = hidden.shape
        target = labels.t().reshape(-1)
        idx = (target != IGNORE_INDEX).nonzero().squeeze(1)
        rows = hidden.reshape(s * b, 1, h).index_select(0, idx)
        logits, _ = self.language_model.output_layer(rows, weight=weight)  # [n, 1, V/tp]
        picked = tensor_parallel.vocab_parallel_cross_entropy(
            logits.float(), target.index_select(0, idx)[:, None].contiguous())
        losses = torch.zeros(s * b, dtype=picked.dtype, device=picked.device)
        losses = losses.index_put((idx,), picked[:, 0])
        return losses.reshape(s, b).t().contiguous()

    # ------------------------------------------------------------------ forward
    def shard(self, tokens: torch.Tensor, position_ids: torch.Tensor,
              labels: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
              n_frames: int = 0) -> BatchShard:
        """This rank's share of a micro-batch under the model's parallel layout."""
        sp = parallel_state.get_context_parallel_world_size() > 1
        tp = parallel_state.get_tensor_model_parallel_world_size()
        return shard_micro_batch(
            tokens, position_ids, labels, cu_seqlens, n_frames, self.tokens_per_frame,
            groups=get_mmsp_groups() if sp else None, ring_type=self.seq_parallel_ring_type,
            multiple_of=tp if self.config.sequence_parallel else 1)

    def visual_embeddings(self, frames: Optional[torch.Tensor], shard: BatchShard):
        """Encode this rank's frames and route them to this rank's placeholders
        (``[n_local_placeholders, h]``; None without frames)."""
        if frames is None or frames.shape[0] == 0:
            return None
        a, b = shard.frames
        if b > a:
            emb = self.encode_frames(frames[a:b]).flatten(0, 1)
        else:
            # MM-SP, no frame to encode here. The route's backward all-to-all is collective:
            # the empty input must require grad exactly when the encoding ranks' outputs do (a
            # trainable vision tower or projector), or this rank would skip it and the others
            # would hang.
            trains_encoder = any(p.requires_grad for p in self.vision_model.parameters()) or \
                any(p.requires_grad for p in self.projector.parameters())
            emb = self.language_model.embedding.word_embeddings.weight.new_zeros(
                (0, self.config.hidden_size)).requires_grad_(
                    trains_encoder and torch.is_grad_enabled())
        return shard.route_visual(emb)

    def local_visual(self, tokens: torch.Tensor, shard: BatchShard,
                     visual_embeddings: torch.Tensor) -> torch.Tensor:
        """Precomputed visual tokens of the whole row (``[n_placeholders, h]``, placeholder
        order, on every rank) -> those of this rank's placeholders."""
        is_vis = tokens[0] == IMAGE_TOKEN_INDEX
        n = int(is_vis.sum())
        if visual_embeddings.shape[0] != n:
            raise ValueError(f"the tokens hold {n} visual placeholder positions but "
                             f"visual_embeddings has {visual_embeddings.shape[0]} rows")
        ordinal = torch.cumsum(is_vis.long(), 0) - 1
        rows = shard.row_index[0][shard.tokens[0] == IMAGE_TOKEN_INDEX]
        return visual_embeddings.index_select(0, ordinal[rows].to(visual_embeddings.device))

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                frames: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None,
                frames_per_sample: Optional[torch.Tensor] = None,
                parallel_output: bool = True, output_rows: Optional[torch.Tensor] = None,
                visual_embeddings: Optional[torch.Tensor] = None) -> LongVILAOutput:
        """Every rank of the SP group passes the same whole micro-batch; each computes its
        share (MM-SP stage 1: its frames, routed; stage 2: its token shard, 2D attention).

        ``output_rows``: input positions whose outputs are wanted (one row; default every
        row): the output layer runs on those of this rank's rows only (long prefill).
        ``visual_embeddings``: the visual tokens of the whole row, precomputed (instead of
        ``frames``; e.g. a V-NIAH haystack encoded once).
        """
        n_frames = 0 if frames is None else int(frames.shape[0])
        shard = self.shard(tokens, position_ids, labels, cu_seqlens, n_frames)
        return self._forward_shard(tokens, shard, frames, visual_embeddings,
                                   shard.packed_seq_params, parallel_output, output_rows)

    def _forward_shard(self, tokens, shard, frames, visual_embeddings, packed, parallel_output,
                       output_rows) -> LongVILAOutput:
        if visual_embeddings is not None:
            visual = self.local_visual(tokens, shard, visual_embeddings)
        else:
            visual = self.visual_embeddings(frames, shard)
        hidden = self.embed(shard.tokens, visual)
        hidden = self.decode(hidden, shard.position_ids, packed)
        rows, labels = shard.row_index, shard.labels
        keep = None
        if output_rows is not None:
            if rows.shape[0] != 1:
                raise ValueError("output_rows needs one row: tokens [1, S]")
            keep = torch.isin(rows[0], torch.as_tensor(output_rows, device=rows.device))
            rows = rows[:, keep]
            labels = None if labels is None else labels[:, keep]
            if not self.config.sequence_parallel:  # (there the output layer gathers the rows)
                hidden, keep = hidden[keep.to(hidden.device)], None
        out = self.output(hidden, labels if keep is None else shard.labels, parallel_output)
        if keep is not None:
            out = out[:, keep.to(out.device)]
        return LongVILAOutput(out, None if labels is None else labels != IGNORE_INDEX, rows)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                cu_seqlens: Optional[torch.Tensor] = None, frames: Optional[torch.Tensor] = None,
                visual_embeddings: Optional[torch.Tensor] = None, max_new_tokens: int = 32,
                output_rows: Optional[torch.Tensor] = None):
        """The forward of a packed row of prompts (``cu_seqlens``: one document each) that
        also fills a :class:`~megatron_longvila.models.kv_cache.KVCache` with this rank's
        keys/values (sharded over the SP group as the layout shards the row), with room for
        ``max_new_tokens`` per prompt. Returns ``(LongVILAOutput of logits, cache)``."""
        self._check_decodable()
        if tokens.shape[0] != 1:
            raise ValueError(f"prefill takes one packed row: tokens [1, S], got {tuple(tokens.shape)}")
        S = tokens.shape[1]
        cu = torch.tensor([0, S], dtype=torch.int32) if cu_seqlens is None else cu_seqlens
        n_frames = 0 if frames is None else int(frames.shape[0])
        shard = self.shard(tokens, position_ids, None, cu, n_frames)
        sp = parallel_state.get_context_parallel_world_size() > 1
        cache = KVCache(rows_per_prompt(shard.row_index[0], cu), max_new_tokens,
                        parallel_state.get_context_parallel_group() if sp else None)
        packed = shard.packed_seq_params
        if isinstance(packed, MMSPPackedSeqParams):
            packed = dataclasses.replace(packed, kv_cache=cache)
        else:
            packed = MMSPPackedSeqParams(**{f.name: getattr(packed, f.name)
                                            for f in dataclasses.fields(packed)},
                                         kv_cache=cache)
        out = self._forward_shard(tokens, shard, frames, visual_embeddings, packed, False,
                                  output_rows)
        cache.decoding = True
        return out, cache

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, position_ids: torch.Tensor, cache: KVCache,
                    prompts: Sequence[int]) -> torch.Tensor:
        """One decoding step: ``tokens [1, n]`` (token j continues prompt ``prompts[j]``) at
        ``position_ids [1, n]`` -> full-vocabulary logits ``[n, V]``, identical on every rank
        of the SP group; their keys/values join the cache (which stays sharded)."""
        self._check_decodable()
        n = tokens.shape[1]
        if len(prompts) != n:
            raise ValueError(f"{n} tokens for {len(prompts)} prompts")
        cache.active = list(prompts)
        cu = torch.arange(n + 1, dtype=torch.int32, device=tokens.device)
        packed = MMSPPackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=1, max_seqlen_kv=1, kv_cache=cache)
        hidden = self.decode(self.embed(tokens, None), position_ids, packed)
        logits = self.output(hidden, None, parallel_output=False)
        cache.advance()
        return logits[0]

    def _check_decodable(self):
        if self.config.sequence_parallel:
            raise ValueError("generation with the KV cache runs without Megatron's sequence "
                             "parallelism (--sequence-parallel): one token per prompt cannot be "
                             "split over the tensor-parallel ranks")
