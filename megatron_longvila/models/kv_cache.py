"""The KV cache of generation: prefill once (sharded as the layout shards it), decode against it.

Why our own (small) cache and not Megatron-Core's inference contexts: Megatron-Core's static
context keeps one ``[max_sequence, max_batch, heads, dim]`` buffer per layer holding the *whole*
context on every rank, advances one shared sequence offset for the batch and rotates keys by
slicing a RoPE table at that offset; its dynamic context pages the cache for flash-attn's /
FlashInfer's kv-cache kernels (neither is installed here; its context-parallel support is
RoPE bookkeeping for Megatron's own CP layout). Our prefill runs under the MM-SP layout
(zigzag ring shards x Ulysses pieces, packed prompts with positions restarting per prompt),
so a rank holds scattered rows of each prompt, and no rank may hold the whole context. So:

* per layer and per prompt, this rank keeps the keys/values of *its own* rows of that prompt
  (post-RoPE, as its core attention saw them before the Ulysses all-to-all; layout padding
  dropped), with room for the generated tokens; generated token ``t`` of a prompt is kept by
  SP rank ``t % sp`` (the cache stays evenly sharded);
* a decode step runs the new tokens (one per active prompt, replicated on every SP rank)
  through the decoder; each layer's core attention attends each prompt's query to this rank's
  share of that prompt's keys (:func:`~megatron_longvila.kernels.attention.partial_attention`:
  the block kernels of training, returning the log-sum-exp), and the shares are combined
  exactly by log-sum-exp over the SP group
  (:func:`~megatron_longvila.kernels.attention.merge_partials`: the merge the ring uses).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..kernels.attention import merge_partials, partial_attention


def rows_per_prompt(row_index: torch.Tensor, cu_seqlens: torch.Tensor) -> List[torch.Tensor]:
    """Local row numbers of each prompt (``row_index [s_local]``: input positions, -1: pad)."""
    cu = cu_seqlens.to(row_index.device).long()
    doc = torch.searchsorted(cu[1:], row_index, right=True)
    doc = torch.where(row_index >= 0, doc, torch.full_like(doc, -1))
    return [torch.nonzero(doc == i).flatten() for i in range(len(cu) - 1)]


@dataclass
class _Layer:
    k: List[torch.Tensor]  # per prompt [capacity, g, d]
    v: List[torch.Tensor]


class KVCache:
    """This rank's share of the keys/values of a packed batch of prompts, every layer.

    ``rows[i]``: this rank's local rows of prompt ``i`` in the prefill's token shard;
    ``max_new_tokens``: room for that many generated tokens per prompt;
    ``group``: the SP group (None at SP=1).
    """

    def __init__(self, rows: List[torch.Tensor], max_new_tokens: int, group=None):
        self.rows = rows
        self.n_prompts = len(rows)
        self.group = group
        self.sp = 1 if group is None else dist.get_world_size(group)
        self.sp_rank = 0 if group is None else dist.get_rank(group)
        self.capacity = [len(r) + (max_new_tokens + self.sp - 1) // self.sp for r in rows]
        self.lengths = [len(r) for r in rows]  # this rank's keys per prompt
        self.generated = [0] * self.n_prompts  # tokens generated per prompt (all ranks)
        self.layers: Dict[int, _Layer] = {}
        self.decoding = False
        self.active: List[int] = list(range(self.n_prompts))

    # -------------------------------------------------------------- prefill
    def store_prefill(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """``key/value [s_local, g, d]`` of the prefill's token shard (post-RoPE)."""
        ks, vs = [], []
        for rows, cap in zip(self.rows, self.capacity):
            idx = rows.to(key.device)
            k = key.new_empty((cap,) + tuple(key.shape[1:]))
            v = value.new_empty((cap,) + tuple(value.shape[1:]))
            k[:len(idx)] = key.index_select(0, idx)
            v[:len(idx)] = value.index_select(0, idx)
            ks.append(k)
            vs.append(v)
        self.layers[layer] = _Layer(ks, vs)

    # -------------------------------------------------------------- decode
    def owns(self, prompt: int) -> bool:
        """Does this rank keep the token the active step generates for ``prompt``?"""
        return self.generated[prompt] % self.sp == self.sp_rank

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float) -> torch.Tensor:
        """One decode step of one layer: ``query [n, h, d]``, ``key/value [n, g, d]`` (row j:
        the new token of prompt ``active[j]``) -> ``[n, h, d]``. The new keys are appended on
        their owning rank; each query attends to all keys of its prompt, across the SP group."""
        L = self.layers[layer]
        n, h, d = query.shape
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        out = query.new_zeros((n, h, d), dtype=acc)
        lse = query.new_full((h, n), float("-inf"), dtype=acc)
        for j, p in enumerate(self.active):
            m = self.lengths[p]
            if self.owns(p):
                if m >= self.capacity[p]:
                    raise RuntimeError(f"KV cache of prompt {p} is full ({self.capacity[p]} keys "
                                       "on this rank): more tokens than max_new_tokens")
                L.k[p][m] = key[j]
                L.v[p][m] = value[j]
                m += 1
            if m:
                o, l = partial_attention(query[j:j + 1], L.k[p][:m], L.v[p][:m], scale)
                out[j] = o[0]
                lse[:, j] = l[:, 0]
        if self.sp > 1:
            outs = [torch.empty_like(out) for _ in range(self.sp)]
            lses = [torch.empty_like(lse) for _ in range(self.sp)]
            dist.all_gather(outs, out.contiguous(), group=self.group)
            dist.all_gather(lses, lse.contiguous(), group=self.group)
            out = merge_partials(outs, lses)
        return out.to(query.dtype)

    def advance(self):
        """After a decode step: the new tokens are in the cache."""
        for p in self.active:
            if self.owns(p):
                self.lengths[p] += 1
            self.generated[p] += 1

    def rewind(self, generated: Optional[List[int]] = None):
        """Forget generated tokens (back to the prompt, or to ``generated[i]`` tokens per
        prompt): e.g. teacher-forced scoring after free generation on one prefill."""
        target = [0] * self.n_prompts if generated is None else list(generated)
        for p in range(self.n_prompts):
            mine = sum(1 for t in range(target[p]) if t % self.sp == self.sp_rank)
            self.lengths[p] = len(self.rows[p]) + mine
            self.generated[p] = target[p]
        self.active = list(range(self.n_prompts))

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for L in self.layers.values()
                   for t in L.k + L.v)
