"""LongVILAModel's forward at sequence-parallel size > 1 (MM-SP stages 1 and 2).

Every rank of the SP group holds the same full micro-batch. Each rank:

1. (vision) encodes its balanced share of the frames and projects them, then sends each
   visual token to the rank whose token shard holds its placeholder (uneven all-to-all);
2. (language) embeds its token shard, puts the received visual tokens into its placeholders,
   runs the decoder with 2D attention (global layout in ``MMSPPackedSeqParams.mmsp``) and
   returns per-token losses (or logits) of its shard only.

The caller reduces the loss with :func:`megatron_longvila.parallel.sharding.sp_loss` (or, since
each rank holds the full micro-batch, divides the local loss sum by the global number of
label tokens and all-reduces the logged value); :func:`gather_sequence` reassembles full-row
outputs (long prefill, tests).
"""

from dataclasses import dataclass

import torch
from megatron.core import parallel_state

from .groups import MMSPGroups, get_mmsp_groups
from .layout import SequenceLayout
from .sharding import (TokenShard, build_vision_route, make_packed_seq_params,
                       route_visual_embeddings, shard_tokens)


@dataclass
class MMSPBatch:
    """The sharding of the last micro-batch (for loss masks, gathering outputs)."""
    layout: SequenceLayout
    shard: TokenShard
    groups: MMSPGroups

    @property
    def loss_mask(self):
        from ..constants import IGNORE_INDEX
        return None if self.shard.labels is None else self.shard.labels != IGNORE_INDEX


def mmsp_forward(model, tokens, position_ids, frames=None, labels=None, cu_seqlens=None,
                 parallel_output=True, ring_type="zigzag_ring_varlen"):
    """The SP>1 forward of ``LongVILAModel`` (see module docstring). Returns
    ``(output_of_local_shard, MMSPBatch)``; output is per-token losses ``[1, s_local]`` with
    labels, else logits ``[1, s_local, V(/tp)]``."""
    if tokens.shape[0] != 1:
        raise ValueError("sequence parallelism takes one packed row: tokens [1, S]")
    groups = get_mmsp_groups()
    S = tokens.shape[1]
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, S], dtype=torch.int32)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    layout = SequenceLayout(cu_seqlens.cpu(), groups.ring_size, groups.ulysses_size, ring_type,
                            multiple_of=tp if model.config.sequence_parallel else 1)
    shard = shard_tokens(layout, groups.sp_rank, tokens, position_ids, labels)
    n_frames = 0 if frames is None else frames.shape[0]
    visual = None
    if n_frames:
        route = build_vision_route(layout, groups.sp_rank, tokens, model.tokens_per_frame,
                                   n_frames)
        a, b = route.frames
        emb_weight = model.language_model.embedding.word_embeddings.weight
        if b > a:
            emb = model.encode_frames(frames[a:b]).flatten(0, 1)
        else:
            # No frame to encode here. The route's backward all-to-all is collective: the empty
            # input must require grad exactly when the encoding ranks' outputs do (a trainable
            # vision tower or projector), or this rank would skip it and the others would hang.
            trains_encoder = any(p.requires_grad for p in model.vision_model.parameters()) or \
                any(p.requires_grad for p in model.projector.parameters())
            emb = emb_weight.new_zeros((0, model.config.hidden_size)).requires_grad_(
                trains_encoder and torch.is_grad_enabled())
        visual = route_visual_embeddings(emb, route, groups.sp_group)
    hidden = model.embed(shard.tokens, visual)
    packed = make_packed_seq_params(layout, groups, device=hidden.device)
    hidden = model.decode(hidden, shard.position_ids, packed)
    out = model.output(hidden, shard.labels, parallel_output)
    return out, MMSPBatch(layout, shard, groups)


@torch.no_grad()
def sp_prefill_logits(model, tokens, position_ids, frames=None, cu_seqlens=None, positions=None):
    """Long prefill under the model's parallel layout; full-vocabulary logits ``[n, V]`` at
    ``positions`` (indices into the original row; default: every token), on every rank.

    At SP > 1 the row is sharded exactly as in training (frames split, 2D attention); each
    rank fills the rows it owns and one all-reduce over the SP group assembles them, so only
    the asked-for rows travel (e.g. the last prompt token of a needle question).
    """
    import torch.distributed as dist
    logits = model(tokens, position_ids, frames, cu_seqlens=cu_seqlens, parallel_output=False)
    S = tokens.shape[1]
    pos = torch.arange(S) if positions is None else torch.as_tensor(positions).reshape(-1).cpu()
    if parallel_state.get_context_parallel_world_size() == 1:
        return logits[0, pos.to(logits.device)]
    mb = model.mmsp_batch
    ppos = mb.layout.orig_to_padded[pos]
    mine = mb.layout.rank_of[ppos] == mb.groups.sp_rank
    out = logits.new_zeros((len(pos), logits.shape[-1]))
    if mine.any():
        rows = mb.layout.local_of[ppos[mine]].to(logits.device)
        out[mine.to(logits.device)] = logits[0, rows]
    dist.all_reduce(out, group=mb.groups.sp_group)
    return out
