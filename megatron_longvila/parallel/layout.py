"""Where every token of a packed row lives under MM-SP, and which blocks of attention exist.

Pure index arithmetic (no communication), built once per micro-batch and shared by the
sharding code, the 2D attention of every layer and the balance report.

Layout of an SP group of ``sp = ulysses x ring`` ranks (CP rank ``c = r * ulysses + u``):

* The packed row (sub-sequences given by ``cu_seqlens``) is padded and cut into ``ring``
  *ring shards* of equal length ``L``:
  - ``ring_varlen``: contiguous pieces of the row;
  - ``zigzag_ring_varlen``: every sub-sequence is cut into ``2 * ring`` equal chunks and ring
    shard ``r`` takes chunks ``r`` and ``2 * ring - 1 - r`` of each sub-sequence, so causal work
    is the same on every ring rank.
* Each ring shard is cut into ``ulysses`` contiguous pieces; rank ``(u, r)`` holds piece ``u`` of
  ring shard ``r``. The Ulysses all-to-all reassembles the ring shard (with ``heads / ulysses``
  heads) on each rank of the Ulysses group.

Padding goes only where the layout needs it: zigzag pads each sub-sequence to a multiple of
``2 * ring`` (pad tokens at its end, invisible to its real tokens under the causal mask), and
one trailing padding sub-sequence makes the length divisible by ``ring * ulysses * multiple_of``.
Pad tokens are masked out of the loss by the sharding code.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..kernels.attention import VarlenBlock

RING_TYPES = ("ring_varlen", "zigzag_ring_varlen")


def sequence_quantum(ring: int = 1, ulysses: int = 1, ring_type: str = "zigzag_ring_varlen",
                     multiple_of: int = 1) -> int:
    """The MM-SP divisibility rule, stated once: a packed row splits evenly over the layout
    when its length is a multiple of ``lcm(2 * ring if zigzag else 1, ring * ulysses *
    multiple_of)`` (``multiple_of``: the TP size under Megatron's sequence parallelism).
    :class:`SequenceLayout` pads every row to it; the trainer and the evaluator check lengths
    against it with :func:`check_sequence_length`."""
    if ring_type not in RING_TYPES:
        raise ValueError(f"ring type {ring_type!r} not in {RING_TYPES}")
    chunk = 2 * ring if ring_type == "zigzag_ring_varlen" and ring > 1 else 1
    return math.lcm(chunk, ring * ulysses * multiple_of)


def check_sequence_length(length: int, ring: int = 1, ulysses: int = 1,
                          ring_type: str = "zigzag_ring_varlen", multiple_of: int = 1,
                          what: str = "sequence length"):
    """Raise ``ValueError`` naming the numbers unless ``length`` is a multiple of
    :func:`sequence_quantum` of the layout."""
    q = sequence_quantum(ring, ulysses, ring_type, multiple_of)
    if length % q:
        raise ValueError(
            f"{what} {length} cannot be split by the sequence-parallel layout: it must be a "
            f"multiple of {q} (sp {ring * ulysses} = {ulysses} Ulysses x {ring} ring, "
            f"{ring_type}{f', x {multiple_of} for sequence parallelism' if multiple_of > 1 else ''})")


@dataclass
class _Run:
    doc: int
    gstart: int  # in the padded row
    gend: int
    lstart: int  # in the ring shard

    @property
    def lend(self):
        return self.lstart + self.gend - self.gstart


class SequenceLayout:
    """Token placement of one packed row under an MM-SP layout (see module docstring).

    Args:
        cu_seqlens: sub-sequence boundaries of the original row (``[n+1]``, last = length).
        ring, ulysses: the SP split (``sp = ring * ulysses``).
        ring_type: ``ring_varlen`` (contiguous) or ``zigzag_ring_varlen``.
        multiple_of: each rank's local length is also a multiple of this (e.g. the TP size
            under Megatron's sequence parallelism).
    """

    def __init__(self, cu_seqlens, ring: int = 1, ulysses: int = 1,
                 ring_type: str = "zigzag_ring_varlen", multiple_of: int = 1):
        if ring_type not in RING_TYPES:
            raise ValueError(f"ring type {ring_type!r} not in {RING_TYPES}")
        cu = [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
        self.ring, self.ulysses, self.sp = ring, ulysses, ring * ulysses
        self.ring_type = ring_type
        self.zigzag = ring_type == "zigzag_ring_varlen" and ring > 1
        self.orig_len = cu[-1]
        lens = [b - a for a, b in zip(cu[:-1], cu[1:]) if b > a]
        starts = [a for a, b in zip(cu[:-1], cu[1:]) if b > a]
        chunk = 2 * ring if self.zigzag else 1
        plens = [math.ceil(n / chunk) * chunk for n in lens]
        quantum = sequence_quantum(ring, ulysses, ring_type, multiple_of)
        total = sum(plens)
        extra = (-total) % quantum
        # documents of the padded row: (orig_start, orig_len, padded_start, padded_len)
        self.docs = []
        p = 0
        for s, n, pn in zip(starts, lens, plens):
            self.docs.append((s, n, p, pn))
            p += pn
        if extra:
            self.docs.append((self.orig_len, 0, p, extra))
            p += extra
        self.padded_len = T = p
        self.shard_len = T // ring  # ring shard length
        self.local_len = T // self.sp
        self.padded_cu_seqlens = torch.tensor([d[2] for d in self.docs] + [T], dtype=torch.int32)

        o2p = []
        for s, n, ps, pn in self.docs:
            o2p.extend(range(ps, ps + n))
        self.orig_to_padded = torch.tensor(o2p, dtype=torch.long)
        self.is_pad = torch.ones(T, dtype=torch.bool)
        self.is_pad[self.orig_to_padded] = False

        # ring shards as runs of the padded row
        self.runs: List[List[_Run]] = []
        for r in range(ring):
            runs, loc = [], 0
            if self.zigzag:
                for i, (_, _, ps, pn) in enumerate(self.docs):
                    c = pn // (2 * ring)
                    for j in (r, 2 * ring - 1 - r):
                        runs.append(_Run(i, ps + j * c, ps + (j + 1) * c, loc))
                        loc += c
            else:
                lo, hi = r * self.shard_len, (r + 1) * self.shard_len
                for i, (_, _, ps, pn) in enumerate(self.docs):
                    a, b = max(lo, ps), min(hi, ps + pn)
                    if b > a:
                        runs.append(_Run(i, a, b, loc))
                        loc += b - a
            assert loc == self.shard_len, (loc, self.shard_len)
            self.runs.append(runs)
        self.ring_shard_index = [torch.cat([torch.arange(x.gstart, x.gend) for x in runs])
                                 for runs in self.runs]
        self.rank_of = torch.empty(T, dtype=torch.long)
        self.local_of = torch.empty(T, dtype=torch.long)
        self.shard_index = []
        for c in range(self.sp):
            r, u = divmod(c, ulysses)
            idx = self.ring_shard_index[r][u * self.local_len:(u + 1) * self.local_len]
            self.shard_index.append(idx)
            self.rank_of[idx] = c
            self.local_of[idx] = torch.arange(self.local_len)
        doc_of = torch.empty(T, dtype=torch.long)
        for i, (_, _, ps, pn) in enumerate(self.docs):
            doc_of[ps:ps + pn] = i
        self.doc_of = doc_of

    # ------------------------------------------------------------------ helpers

    def ring_shard_block_pairs(self, r: int, src: int) -> int:
        b = self.attention_block(r, src)
        return 0 if b is None else b.pairs()

    def local_cu_seqlens(self, cp_rank: int) -> torch.Tensor:
        """Boundaries of document runs inside rank ``cp_rank``'s local shard (int32)."""
        idx = self.shard_index[cp_rank]
        d = self.doc_of[idx]
        g = idx
        brk = torch.nonzero((d[1:] != d[:-1]) | (g[1:] != g[:-1] + 1)).flatten() + 1
        return torch.cat([torch.zeros(1, dtype=torch.long), brk,
                          torch.tensor([len(idx)])]).to(torch.int32)

    def attention_block(self, r: int, src: int) -> Optional[VarlenBlock]:
        """The varlen call for queries of ring shard ``r`` against keys of ring shard ``src``."""
        return _block(self, r, src)

    def attention_blocks(self, r: int) -> List[Optional[VarlenBlock]]:
        return [self.attention_block(r, s) for s in range(self.ring)]


def _block(layout: SequenceLayout, r: int, src: int) -> Optional[VarlenBlock]:
    cache = layout.__dict__.setdefault("_blocks", {})
    if (r, src) in cache:
        return cache[(r, src)]
    L = layout.shard_len
    if r == src:
        # each document's runs are adjacent in the shard and ordered by position: causal over
        # the concatenation is exactly "same document and key position <= query position".
        ranges, cur = [], None
        for x in layout.runs[r]:
            if cur is not None and cur[0] == x.doc and cur[2] == x.lstart:
                cur[2] = x.lend
            else:
                if cur is not None:
                    ranges.append((cur[1], cur[2]))
                cur = [x.doc, x.lstart, x.lend]
        if cur is not None:
            ranges.append((cur[1], cur[2]))
        blk = VarlenBlock(ranges, list(ranges), True, L, L)
    else:
        qd: Dict[int, List[_Run]] = {}
        kd: Dict[int, List[_Run]] = {}
        for x in layout.runs[r]:
            qd.setdefault(x.doc, []).append(x)
        for x in layout.runs[src]:
            kd.setdefault(x.doc, []).append(x)
        qr, kr = [], []
        for doc in sorted(set(qd) & set(kd)):
            vis = {}
            for a in qd[doc]:
                for b in kd[doc]:
                    if b.gend <= a.gstart:
                        vis[(id(a), id(b))] = True
                    elif b.gstart >= a.gend:
                        vis[(id(a), id(b))] = False
                    else:
                        raise AssertionError("runs of different shards overlap")
            qv = [a for a in qd[doc] if any(vis[(id(a), id(b))] for b in kd[doc])]
            kv = [b for b in kd[doc] if any(vis[(id(a), id(b))] for a in qd[doc])]
            if not qv:
                continue
            assert all(vis[(id(a), id(b))] for a in qv for b in kv), "block is not a product"
            for runs in (qv, kv):
                assert all(p.lend == n.lstart for p, n in zip(runs[:-1], runs[1:])), \
                    "visible runs not adjacent"
            qr.append((qv[0].lstart, qv[-1].lend))
            kr.append((kv[0].lstart, kv[-1].lend))
        blk = VarlenBlock(qr, kr, False, L, L) if qr else None
    cache[(r, src)] = blk
    return blk


def split_frames(frame_tokens: Sequence[int], sp: int) -> List[Tuple[int, int]]:
    """Contiguous frame ranges, one per SP rank, balanced by visual tokens.

    ``frame_tokens[f]`` is the number of visual tokens of frame ``f``. Frame ``f`` goes to the
    rank whose share of the total tokens holds its midpoint, so with equal frames the ranks
    differ by at most one frame.
    """
    total = sum(frame_tokens)
    bounds = [0] * (sp + 1)
    acc = 0
    owner = []
    for t in frame_tokens:
        mid2 = 2 * acc + t  # 2 * midpoint, integer arithmetic
        owner.append(min(sp - 1, (mid2 * sp) // (2 * total)) if total else 0)
        acc += t
    for c in range(sp):
        bounds[c + 1] = bounds[c] + sum(1 for o in owner if o == c)
    return [(bounds[c], bounds[c + 1]) for c in range(sp)]
