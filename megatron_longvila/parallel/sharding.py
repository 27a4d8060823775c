"""MM-SP sharding of one micro-batch: tokens (stage 2), frames (stage 1), the route of the
projected visual embeddings between them, and the loss across the SP group.

Every rank of an SP group holds the whole micro-batch (the loader splits by data-parallel
rank only), so every plan below is computed locally, identically on all SP ranks, with no
communication; only the embeddings and the loss terms travel.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .layout import SequenceLayout, VarlenBlock, split_frames  # noqa: F401 (re-exported)

PAD_TOKEN_ID = 0


# ------------------------------------------------------------------ stage 2: tokens

def pad_row(x: torch.Tensor, layout: SequenceLayout, fill) -> torch.Tensor:
    """Original row ``x [S, ...]`` -> padded row ``[T, ...]`` (``fill`` at pad positions)."""
    out = torch.full((layout.padded_len,) + tuple(x.shape[1:]), fill, dtype=x.dtype,
                     device=x.device)
    return out.index_copy(0, layout.orig_to_padded.to(x.device), x)


def padded_position_ids(position_ids: torch.Tensor, layout: SequenceLayout) -> torch.Tensor:
    """Global position ids of the padded row: real tokens keep theirs; a sub-sequence's pad
    tokens continue its positions; the trailing padding sub-sequence counts from 0."""
    pos = pad_row(position_ids, layout, 0)
    for s, n, ps, pn in layout.docs:
        if pn > n:
            first = int(position_ids[s + n - 1]) + 1 if n else 0
            pos[ps + n:ps + pn] = torch.arange(first, first + pn - n, dtype=pos.dtype)
    return pos


@dataclass
class TokenShard:
    """This rank's share of the packed row (``[1, s_local]`` tensors, padded layout order)."""
    tokens: torch.Tensor
    labels: Optional[torch.Tensor]
    position_ids: torch.Tensor
    index: torch.Tensor  # padded-row positions of the local tokens
    row_index: torch.Tensor  # [1, s_local]: input-row position of each local token (-1: pad)


def shard_tokens(layout: SequenceLayout, cp_rank: int, tokens: torch.Tensor,
                 position_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> TokenShard:
    """Cut ``tokens / labels / position_ids [1, S]`` to rank ``cp_rank``'s shard.

    Pad tokens get token id 0 and label ``IGNORE_INDEX`` (out of the loss); positions stay
    global, so RoPE sees true positions.
    """
    idx = layout.shard_index[cp_rank].to(tokens.device)
    tok = pad_row(tokens[0], layout, PAD_TOKEN_ID)[idx][None]
    pos = padded_position_ids(position_ids[0], layout)[idx][None]
    lab = None if labels is None else pad_row(labels[0], layout, IGNORE_INDEX)[idx][None]
    padded_to_orig = torch.full((layout.padded_len,), -1, dtype=torch.long)
    padded_to_orig[layout.orig_to_padded] = torch.arange(len(layout.orig_to_padded))
    rows = padded_to_orig[idx.cpu()][None].to(tokens.device)
    return TokenShard(tok, lab, pos, idx, rows)


def gather_sequence(x_local: torch.Tensor, row_index: torch.Tensor, length: int, group,
                    dim: int = 0) -> torch.Tensor:
    """All-gather the ranks' output rows along ``dim`` into the input row's order (layout
    padding dropped): ``row_index [s_local]`` is each local row's position in the input row
    (``-1`` at padding), as :class:`BatchShard` / the model's output give it. No autograd.

    Used for logits/tests and for a long prefill whose full output is wanted.
    """
    x_local = x_local.movedim(dim, 0).contiguous()
    row_index = row_index.reshape(-1).to(x_local.device)
    if group is None or dist.get_world_size(group) == 1:
        parts, rows = [x_local], [row_index]
    else:
        parts = [torch.empty_like(x_local) for _ in range(dist.get_world_size(group))]
        rows = [torch.empty_like(row_index) for _ in parts]
        dist.all_gather(parts, x_local, group=group)
        dist.all_gather(rows, row_index, group=group)
    x, r = torch.cat(parts), torch.cat(rows)
    keep = r >= 0
    full = x.new_zeros((length,) + tuple(x.shape[1:]))
    full[r[keep]] = x[keep]
    return full.movedim(0, dim)


def select_rows(x_local: torch.Tensor, row_index: torch.Tensor, positions, group=None
                ) -> torch.Tensor:
    """The output rows at ``positions`` (indices into the input row) on every rank.

    ``x_local [s_local, ...]`` holds this rank's rows, ``row_index [s_local]`` their input
    positions (``-1`` at padding). Each rank fills the asked-for rows it holds and one
    all-reduce over ``group`` assembles them, so only those rows travel (e.g. the last prompt
    token of a question). At SP=1 it is plain indexing.
    """
    pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1).to(x_local.device)
    row_index = row_index.reshape(-1).to(x_local.device)
    single = group is None or dist.get_world_size(group) == 1
    if single and row_index.numel() == x_local.shape[0] and bool(
            (row_index == torch.arange(len(row_index), device=row_index.device)).all()):
        return x_local[pos]
    n = max(int(pos.max()) if pos.numel() else 0,
            int(row_index.max()) if row_index.numel() else 0) + 1
    where = torch.full((n,), -1, dtype=torch.long, device=x_local.device)
    valid = row_index >= 0
    where[row_index[valid]] = torch.arange(len(row_index), device=x_local.device)[valid]
    local = where[pos]
    mine = local >= 0
    out = x_local.new_zeros((len(pos),) + tuple(x_local.shape[1:]))
    if bool(mine.any()):
        out[mine] = x_local[local[mine]]
    if not single:
        dist.all_reduce(out, group=group)
    return out


# ------------------------------------------------------------------ stage 1: frames

@dataclass
class VisionRoute:
    """Where this rank's projected visual tokens go, and where the received ones land.

    ``send_perm``: order of the local visual tokens (frames ``frames[0]:frames[1]``, flattened)
    grouped by destination rank; ``send_counts`` / ``recv_counts`` per rank;
    ``recv_perm``: index into the received tokens giving the local placeholder order (None if
    already in order).
    """
    frames: Tuple[int, int]
    send_perm: Optional[torch.Tensor]
    send_counts: List[int]
    recv_counts: List[int]
    recv_perm: Optional[torch.Tensor]
    n_local_slots: int


def build_vision_route(layout: SequenceLayout, cp_rank: int, tokens: torch.Tensor,
                       tokens_per_frame: int, n_frames: int,
                       frame_ranges: Optional[List[Tuple[int, int]]] = None) -> VisionRoute:
    """Plan stage 1 for rank ``cp_rank``: which frames it encodes and how the embeddings travel
    to the ranks whose token shards hold their placeholders."""
    sp = layout.sp
    if frame_ranges is None:
        frame_ranges = split_frames([tokens_per_frame] * n_frames, sp)
    vis_pos = torch.nonzero(tokens[0].cpu() == IMAGE_TOKEN_INDEX).flatten()
    V = n_frames * tokens_per_frame
    if vis_pos.numel() != V:
        raise ValueError(f"the tokens hold {vis_pos.numel()} visual placeholder positions but the "
                         f"frames give {V} visual tokens ({tokens_per_frame} per frame)")
    ppos = layout.orig_to_padded[vis_pos]
    owner = layout.rank_of[ppos]            # [V] destination rank of visual token v
    local = layout.local_of[ppos]           # [V] its local slot index on the owner
    enc = torch.empty(V, dtype=torch.long)  # [V] encoding rank
    for c, (a, b) in enumerate(frame_ranges):
        enc[a * tokens_per_frame:b * tokens_per_frame] = c
    a, b = frame_ranges[cp_rank]
    mine = torch.arange(a * tokens_per_frame, b * tokens_per_frame)
    send_perm = torch.sort(owner[mine], stable=True).indices
    send_counts = torch.bincount(owner[mine], minlength=sp).tolist()
    incoming = torch.nonzero(owner == cp_rank).flatten()          # v order
    order = torch.sort(enc[incoming], stable=True).indices       # arrival order: by source, v
    arrival = incoming[order]
    recv_counts = torch.bincount(enc[incoming], minlength=sp).tolist()
    # local placeholder order is increasing local slot index
    recv_perm = torch.sort(local[arrival], stable=True).indices
    ident = lambda p: None if torch.equal(p, torch.arange(len(p))) else p  # noqa: E731
    return VisionRoute((a, b), ident(send_perm), send_counts, recv_counts, ident(recv_perm),
                       len(incoming))


class _RouteAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group):
        ctx.args = (send_counts, recv_counts, group)
        return _a2a_uneven(x, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, g):
        send_counts, recv_counts, group = ctx.args
        return _a2a_uneven(g.contiguous(), recv_counts, send_counts, group), None, None, None


def _a2a_uneven(x, send_counts, recv_counts, group):
    out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    return out


def route_visual_embeddings(emb: torch.Tensor, route: VisionRoute, group) -> torch.Tensor:
    """``emb [n_local_visual_tokens, h]`` (this rank's frames, in order) ->
    ``[n_local_slots, h]``: the embeddings of this rank's placeholders, in local order.
    Autograd-aware: gradients go back to the encoding ranks through the reverse all-to-all."""
    if route.send_perm is not None:
        emb = emb.index_select(0, route.send_perm.to(emb.device))
    out = _RouteAllToAll.apply(emb, route.send_counts, route.recv_counts, group)
    if route.recv_perm is not None:
        out = out.index_select(0, route.recv_perm.to(out.device))
    return out


# ------------------------------------------------------------------ attention context

@dataclass
class MMSPContext:
    """What the 2D attention of every layer needs for one micro-batch."""
    layout: SequenceLayout
    groups: object  # MMSPGroups
    blocks: List[Optional[VarlenBlock]]


@dataclass
class MMSPPackedSeqParams(PackedSeqParams):
    """``PackedSeqParams`` (local shard boundaries in ``cu_seqlens_q``) + the global layout
    (None at SP=1) + the model's KV cache when generating (``models.kv_cache``; None else)."""
    mmsp: Optional[MMSPContext] = None
    kv_cache: object = None


def make_packed_seq_params(layout: SequenceLayout, groups, device=None) -> MMSPPackedSeqParams:
    cu = layout.local_cu_seqlens(groups.sp_rank)
    if device is not None:
        cu = cu.to(device)
    mx = int((cu[1:] - cu[:-1]).max())
    ctx = MMSPContext(layout, groups, layout.attention_blocks(groups.ring_rank))
    return MMSPPackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                               max_seqlen_q=mx, max_seqlen_kv=mx, mmsp=ctx)


# ------------------------------------------------------------------ one micro-batch

@dataclass
class BatchShard:
    """This rank's share of one micro-batch: what its forward computes and how its visual
    embeddings travel. At SP=1 it is the trivial layout (the whole batch, no route).

    ``tokens / position_ids / labels / row_index`` are ``[b, s_local]`` (``row_index``: each
    local row's position in the input row, ``-1`` at layout padding); ``frames`` the range of
    frames this rank encodes; ``route`` (None at SP=1) takes their embeddings to the ranks
    whose tokens hold their placeholders.
    """
    tokens: torch.Tensor
    position_ids: torch.Tensor
    labels: Optional[torch.Tensor]
    row_index: torch.Tensor
    packed_seq_params: Optional[PackedSeqParams]
    frames: Tuple[int, int]
    route: Optional[VisionRoute] = None
    group: object = None

    @property
    def loss_mask(self) -> Optional[torch.Tensor]:
        """``[b, s_local]`` bool: the rows holding a label (None without labels)."""
        return None if self.labels is None else self.labels != IGNORE_INDEX

    def route_visual(self, emb: torch.Tensor) -> torch.Tensor:
        """This rank's encoded visual tokens -> the embeddings of its placeholders."""
        return emb if self.route is None else route_visual_embeddings(emb, self.route, self.group)


def shard_micro_batch(tokens: torch.Tensor, position_ids: torch.Tensor,
                      labels: Optional[torch.Tensor] = None,
                      cu_seqlens: Optional[torch.Tensor] = None, n_frames: int = 0,
                      tokens_per_frame: int = 1, groups=None,
                      ring_type: str = "zigzag_ring_varlen", multiple_of: int = 1) -> BatchShard:
    """Plan one micro-batch for this rank: at SP=1 (``groups`` None or of size 1) the whole
    batch (``cu_seqlens`` -> ``PackedSeqParams``; packed input is one row); at SP>1 the MM-SP
    layout (one packed row): token shard with global positions, balanced frame range, route
    of the visual embeddings, ``MMSPPackedSeqParams`` carrying the layout to the attention.
    """
    if groups is None or groups.sp_size == 1:
        packed = None
        if cu_seqlens is not None:
            if tokens.shape[0] != 1:
                raise ValueError("packed input (cu_seqlens) must be one row: tokens [1, S], got "
                                 f"{tokens.shape[0]} rows")
            cu = cu_seqlens.to(torch.int32)
            max_len = int((cu[1:] - cu[:-1]).max())
            packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=max_len, max_seqlen_kv=max_len)
        rows = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        return BatchShard(tokens, position_ids, labels, rows, packed, (0, n_frames))
    if tokens.shape[0] != 1:
        raise ValueError("sequence parallelism takes one packed row: tokens [1, S], got "
                         f"{tokens.shape[0]} rows")
    S = tokens.shape[1]
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, S], dtype=torch.int32)
    layout = SequenceLayout(cu_seqlens.cpu(), groups.ring_size, groups.ulysses_size, ring_type,
                            multiple_of=multiple_of)
    shard = shard_tokens(layout, groups.sp_rank, tokens, position_ids, labels)
    route, frames = None, (0, 0)
    if n_frames:
        route = build_vision_route(layout, groups.sp_rank, tokens, tokens_per_frame, n_frames)
        frames = route.frames
    packed = make_packed_seq_params(layout, groups, device=tokens.device)
    return BatchShard(shard.tokens, shard.position_ids, shard.labels, shard.row_index, packed,
                      frames, route, groups.sp_group)


# ------------------------------------------------------------------ loss

def sp_loss(token_losses: torch.Tensor, loss_mask: torch.Tensor, group=None):
    """Mean token loss over the whole SP group, equal to the single-process loss.

    The per-rank sum of token losses and the per-rank token count are all-reduced (sum) over
    ``group``. The returned loss has the global value; its gradient is this rank's share
    (``d local_sum / global_count``), so the gradients summed over the SP ranks are the
    single-process gradients. (Megatron's DDP averages over DP x CP: scale by the CP size
    there, as Megatron-LM's own CP loss does.) Returns ``(loss, global_sum, global_count)``.
    """
    mask = loss_mask.to(token_losses.dtype)
    local_sum = (token_losses * mask).sum()
    local_cnt = mask.sum()
    stats = torch.stack([local_sum.detach(), local_cnt.detach()]).to(torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(stats, group=group)
    gsum = stats[0].to(token_losses.dtype)
    gcnt = stats[1].to(token_losses.dtype)
    loss = (local_sum + (gsum - local_sum.detach())) / gcnt.clamp(min=1)
    return loss, gsum, gcnt
