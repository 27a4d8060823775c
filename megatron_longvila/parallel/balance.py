"""How evenly an MM-SP layout spreads one micro-batch's work over the SP ranks."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from ..constants import IMAGE_TOKEN_INDEX
from .layout import SequenceLayout, split_frames


@dataclass
class BalanceReport:
    visual_tokens: List[int]   # stage 1: visual tokens each rank encodes
    text_tokens: List[int]     # stage 2: real (non-pad) language-model tokens in each shard
                               # (text and visual embeddings alike: the decoder's work)
    seq_tokens: List[int]      # stage 2: all tokens (incl. pad) in each rank's shard
    attn_flops: List[float]    # causal attention FLOPs (forward) each rank computes
    pure_text_tokens: List[int]  # stage 2: non-visual, non-pad tokens (informative only)

    @staticmethod
    def _ratio(xs):
        m = sum(xs) / len(xs)
        return max(xs) / m if m else 1.0

    def ratios(self) -> Dict[str, float]:
        """max / mean per quantity (1.0 = perfect balance)."""
        return {k: self._ratio(getattr(self, k))
                for k in ("visual_tokens", "text_tokens", "seq_tokens", "attn_flops")}

    def table(self) -> str:
        rows = ["rank  visual_tok  text_tok  seq_tok  attn_GFLOP"]
        for c in range(len(self.visual_tokens)):
            rows.append(f"{c:4d}  {self.visual_tokens[c]:10d}  {self.text_tokens[c]:8d}  "
                        f"{self.seq_tokens[c]:7d}  {self.attn_flops[c] / 1e9:10.4f}")
        rows.append("max/mean " + "  ".join(f"{k}={v:.3f}" for k, v in self.ratios().items()))
        return "\n".join(rows)


def balance_report(tokens: torch.Tensor, cu_seqlens, n_frames: int, tokens_per_frame: int,
                   sp: int, ring: int, ring_type: str = "zigzag_ring_varlen",
                   num_heads: int = 32, head_dim: int = 128,
                   frame_tokens: Optional[Sequence[int]] = None,
                   multiple_of: int = 1) -> BalanceReport:
    """Per-rank work of a micro-batch (``tokens [1,S]`` or ``[S]``) under a layout.

    Attention FLOPs count ``4 * head_dim`` per attended (query, key) pair and head
    (QK^T and PV); after the Ulysses all-to-all a rank computes ``num_heads / ulysses`` heads
    of its whole ring shard.
    """
    tokens = tokens.reshape(-1).cpu()
    ulysses = sp // ring
    layout = SequenceLayout(cu_seqlens, ring, ulysses, ring_type, multiple_of)
    ft = list(frame_tokens) if frame_tokens is not None else [tokens_per_frame] * n_frames
    vis = [sum(ft[a:b]) for a, b in split_frames(ft, sp)]
    text_row = torch.zeros(layout.padded_len, dtype=torch.bool)
    text_row[layout.orig_to_padded] = tokens != IMAGE_TOKEN_INDEX
    pure = [int(text_row[layout.shard_index[c]].sum()) for c in range(sp)]
    real = ~layout.is_pad
    text = [int(real[layout.shard_index[c]].sum()) for c in range(sp)]
    seq = [layout.local_len] * sp
    heads_local = num_heads / ulysses
    pairs = [sum(layout.ring_shard_block_pairs(r, s) for s in range(ring)) for r in range(ring)]
    flops = [4.0 * head_dim * heads_local * pairs[c // ulysses] for c in range(sp)]
    return BalanceReport(vis, text, seq, flops, pure)
