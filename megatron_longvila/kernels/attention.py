"""Attention kernels: varlen blocks, ring attention, Ulysses all-to-all, the MM-SP 2D attention.

The math of MM-SP attention on plain tensors and process groups (it knows no model and no
batch layout: a layout describes its attention as :class:`VarlenBlock` s). Ulysses all-to-all
inside the Ulysses group, ring attention across the ring group, document (varlen) + causal
masks given by the blocks.

Shapes (``b`` = 1, packed): local ``q [s, h, d]``, ``k/v [s, g, d]`` with ``h`` heads and ``g``
KV heads per tensor-parallel rank. Steps:

1. Ulysses all-to-all (sequence <-> heads): each rank of the Ulysses group gets the whole ring
   shard for ``h / U`` query heads and the KV heads those query heads use (GQA: KV heads are
   split when ``U`` divides ``g``, replicated ``U / g`` times when ``g`` divides ``U``).
2. Ring attention over the ring group: KV blocks travel around the ring with send/recv posted
   before the current block is computed; partial outputs are merged by log-sum-exp. The
   backward is a second ring pass: each KV block's gradient travels with it and arrives home
   after ``ring`` steps; query gradients stay local.
3. The inverse all-to-all.

Kernels for one block (``VarlenBlock``): on CUDA, segments of at least
``MMSP_CUDNN_MIN_LEN`` (default 2048; backward ``MMSP_CUDNN_BWD_MIN_LEN``, default 8192)
query and key tokens go to cuDNN's dense SDPA kernel
(``aten._scaled_dot_product_cudnn_attention``, the fastest on H100, with log-sum-exp), the
rest to one varlen flash call (``aten._flash_attention_forward`` with cu_seqlens); both
backwards take the *final* output and log-sum-exp, which makes per-block gradients exact
(so forward and backward may pick different kernels for a segment).
On the CPU (float32 / bfloat16) torch's CPU flash kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, returns the log-sum-exp) per segment;
otherwise (float64, or forced) an exact math path. ``MMSP_ATTENTION_BACKEND=math|cuda|cpu_flash`` forces a path; ``MMSP_CUDNN_MIN_LEN=0`` disables
cuDNN. (The flash-attn package is not used: torch's own flash kernel is the same kernel.)
"""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist


_NEG_INF = float("-inf")


@dataclass
class VarlenBlock:
    """One varlen attention call between a query shard and a key/value shard.

    Segment ``i`` lets local query rows ``q_ranges[i]`` attend to local key rows
    ``k_ranges[i]``; with ``causal`` every segment is square and causally masked.
    Query ranges are disjoint and increasing; rows in no segment get no contribution.
    """
    q_ranges: List[Tuple[int, int]]
    k_ranges: List[Tuple[int, int]]
    causal: bool
    q_len: int
    k_len: int
    _cache: Dict = field(default_factory=dict, repr=False, compare=False)

    def pairs(self) -> int:
        """Number of attended (query, key) pairs."""
        tot = 0
        for (qs, qe), (ks, ke) in zip(self.q_ranges, self.k_ranges):
            n, m = qe - qs, ke - ks
            tot += n * (n + 1) // 2 if self.causal else n * m
        return tot

    @staticmethod
    def _index(ranges, total):
        if len(ranges) and ranges[0][0] == 0 and ranges[-1][1] == total and all(
                a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:])):
            return None  # identity
        return torch.cat([torch.arange(s, e) for s, e in ranges]) if ranges else \
            torch.zeros(0, dtype=torch.long)

    def tensors(self, device):
        """``(q_index|None, k_index|None, cu_q int32, cu_k int32, max_q, max_k)`` on ``device``."""
        key = str(device)
        if key not in self._cache:
            qi, ki = self._index(self.q_ranges, self.q_len), self._index(self.k_ranges, self.k_len)
            lq = [e - s for s, e in self.q_ranges]
            lk = [e - s for s, e in self.k_ranges]
            cu_q = torch.tensor([0] + list(_cumsum(lq)), dtype=torch.int32)
            cu_k = torch.tensor([0] + list(_cumsum(lk)), dtype=torch.int32)
            mv = lambda t: None if t is None else t.to(device)  # noqa: E731
            self._cache[key] = (mv(qi), mv(ki), cu_q.to(device), cu_k.to(device),
                                max(lq, default=0), max(lk, default=0))
        return self._cache[key]


def _cumsum(xs):
    t = 0
    for x in xs:
        t += x
        yield t


def _backend(x: torch.Tensor) -> str:
    forced = os.environ.get("MMSP_ATTENTION_BACKEND")
    if forced:
        return forced
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        return "cuda"
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        # (float64 keeps the exact math path: the reference-grade path of the tests)
        return "cpu_flash"
    return "math"


# ------------------------------------------------------------------ one block: forward / backward

def _acc_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def block_forward(q, k, v, blk: VarlenBlock, scale: float):
    """Attention of ``q [Lq,h,d]`` on ``k/v [Lk,g,d]`` restricted to ``blk``.

    Returns ``out [Lq,h,d]`` (accumulation dtype, zero on uncovered rows) and
    ``lse [h,Lq]`` (``-inf`` on uncovered rows).
    """
    backend = _backend(q)
    if backend == "cuda":
        return _cuda_block_forward(q, k, v, blk, scale)
    if backend == "cpu_flash":
        return _cpu_flash_block_forward(q, k, v, blk, scale)
    Lq, h, d = q.shape
    g = k.shape[1]
    rep = h // g
    acc = _acc_dtype(q)
    out = q.new_zeros((Lq, h, d), dtype=acc)
    lse = q.new_full((h, Lq), _NEG_INF, dtype=acc)
    for (qs, qe), (ks, ke) in zip(blk.q_ranges, blk.k_ranges):
        qq = q[qs:qe].to(acc).view(qe - qs, g, rep, d)
        kk, vv = k[ks:ke].to(acc), v[ks:ke].to(acc)
        s = torch.einsum("qgrd,kgd->grqk", qq, kk) * scale
        if blk.causal:
            s = s.masked_fill(torch.ones(qe - qs, ke - ks, dtype=torch.bool,
                                         device=q.device).triu(1), _NEG_INF)
        m = torch.logsumexp(s, dim=-1)  # [g, rep, q]
        p = torch.exp(s - m.unsqueeze(-1))
        out[qs:qe] = torch.einsum("grqk,kgd->qgrd", p, vv).reshape(qe - qs, h, d)
        lse[:, qs:qe] = m.reshape(h, qe - qs)
    return out, lse


def block_backward(dout, q, k, v, out, lse, delta, blk: VarlenBlock, scale: float):
    """Gradients of one block given the *final* ``out``, ``lse [h,Lq]`` and
    ``delta = rowsum(dout * out) [h,Lq]``. Returns ``dq, dk, dv`` (accumulation dtype)."""
    backend = _backend(q)
    if backend == "cuda":
        return _cuda_block_backward(dout, q, k, v, out, lse, blk, scale)
    if backend == "cpu_flash":
        return _cpu_flash_block_backward(dout, q, k, v, out, lse, blk, scale)
    Lq, h, d = q.shape
    g = k.shape[1]
    rep = h // g
    acc = _acc_dtype(q)
    dq = q.new_zeros((Lq, h, d), dtype=acc)
    dk = k.new_zeros(k.shape, dtype=acc)
    dv = v.new_zeros(v.shape, dtype=acc)
    for (qs, qe), (ks, ke) in zip(blk.q_ranges, blk.k_ranges):
        n = qe - qs
        qq = q[qs:qe].to(acc).view(n, g, rep, d)
        do = dout[qs:qe].to(acc).view(n, g, rep, d)
        kk, vv = k[ks:ke].to(acc), v[ks:ke].to(acc)
        s = torch.einsum("qgrd,kgd->grqk", qq, kk) * scale
        if blk.causal:
            s = s.masked_fill(torch.ones(n, ke - ks, dtype=torch.bool,
                                         device=q.device).triu(1), _NEG_INF)
        p = torch.exp(s - lse[:, qs:qe].reshape(g, rep, n, 1))
        dp = torch.einsum("qgrd,kgd->grqk", do, vv)
        ds = p * (dp - delta[:, qs:qe].reshape(g, rep, n, 1))
        dq[qs:qe] += (torch.einsum("grqk,kgd->qgrd", ds, kk) * scale).reshape(n, h, d)
        dk[ks:ke] += torch.einsum("grqk,qgrd->kgd", ds, qq) * scale
        dv[ks:ke] += torch.einsum("grqk,qgrd->kgd", p, do)
    return dq, dk, dv


def _cudnn_min(backward: bool = False) -> int:
    """Shortest segment for cuDNN (H100: its forward wins from ~2k tokens, its backward only
    from ~8k; below that one varlen flash call beats a loop of per-document calls)."""
    fwd = int(os.environ.get("MMSP_CUDNN_MIN_LEN", "2048"))
    if not backward or fwd <= 0:
        return fwd
    return max(fwd, int(os.environ.get("MMSP_CUDNN_BWD_MIN_LEN", "8192")))


def _split_for_cudnn(blk: VarlenBlock, backward: bool = False):
    """``(big segment indices, VarlenBlock of the rest or None)``, cached on the block."""
    lim = _cudnn_min(backward)
    key = ("cudnn_split", lim)
    if key not in blk._cache:
        big, rest_q, rest_k = [], [], []
        for i, ((qs, qe), (ks, ke)) in enumerate(zip(blk.q_ranges, blk.k_ranges)):
            if lim > 0 and qe - qs >= lim and ke - ks >= lim:
                big.append(i)
            else:
                rest_q.append((qs, qe))
                rest_k.append((ks, ke))
        rest = (VarlenBlock(rest_q, rest_k, blk.causal, blk.q_len, blk.k_len)
                if rest_q else None)
        blk._cache[key] = (big, rest)
    return blk._cache[key]


def _bhsd(x):
    return x.permute(1, 0, 2).unsqueeze(0)  # [s, h, d] -> [1, h, s, d] (a view)


def _cuda_block_forward(q, k, v, blk, scale):
    big, rest = _split_for_cudnn(blk)
    if not big:
        return _flash_block_forward(q, k, v, blk, scale)
    Lq, h, d = q.shape
    if rest is None and len(big) == 1 and blk.q_ranges[0] == (0, Lq):
        (ks, ke), = blk.k_ranges
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(
            _bhsd(q), _bhsd(k[ks:ke]), _bhsd(v[ks:ke]), None, True, 0.0, blk.causal, False,
            scale=scale)
        return r[0][0].permute(1, 0, 2), r[1][0, :, :, 0].float()
    if rest is not None:
        out, lse = _flash_block_forward(q, k, v, rest, scale)
        out = out.to(q.dtype)
    else:
        out = q.new_zeros((Lq, h, d))
        lse = q.new_full((h, Lq), _NEG_INF, dtype=torch.float32)
    for i in big:
        (qs, qe), (ks, ke) = blk.q_ranges[i], blk.k_ranges[i]
        r = torch.ops.aten._scaled_dot_product_cudnn_attention(
            _bhsd(q[qs:qe]), _bhsd(k[ks:ke]), _bhsd(v[ks:ke]), None, True, 0.0, blk.causal,
            False, scale=scale)
        out[qs:qe] = r[0][0].permute(1, 0, 2)
        lse[:, qs:qe] = r[1][0, :, :, 0]
    return out, lse


def _cuda_block_backward(dout, q, k, v, out, lse, blk, scale):
    # segments of a block are disjoint in query rows and in key rows: no accumulation here
    big, rest = _split_for_cudnn(blk, backward=True)
    if not big:
        return _flash_block_backward(dout, q, k, v, out, lse, blk, scale)
    if rest is not None:
        dq, dk, dv = _flash_block_backward(dout, q, k, v, out, lse, rest, scale)
    else:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    seed = torch.zeros((), dtype=torch.int64, device=q.device)  # no dropout: unused
    for i in big:
        (qs, qe), (ks, ke) = blk.q_ranges[i], blk.k_ranges[i]
        o_ = _bhsd(out[qs:qe].to(q.dtype)).contiguous()
        do_ = _bhsd(dout[qs:qe].to(q.dtype)).contiguous()
        l_ = lse[:, qs:qe].float().contiguous()[None, :, :, None]
        a, b, c = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do_, _bhsd(q[qs:qe]), _bhsd(k[ks:ke]), _bhsd(v[ks:ke]), o_, l_, seed, seed, None,
            None, None, qe - qs, ke - ks, 0.0, blk.causal, scale=scale)
        dq[qs:qe] = a[0].permute(1, 0, 2)
        dk[ks:ke] = b[0].permute(1, 0, 2)
        dv[ks:ke] = c[0].permute(1, 0, 2)
    return dq, dk, dv


def _cpu_flash_block_forward(q, k, v, blk, scale):
    Lq, h, d = q.shape
    rep = h // k.shape[1]
    out = q.new_zeros((Lq, h, d))
    lse = q.new_full((h, Lq), _NEG_INF, dtype=torch.float32)
    for (qs, qe), (ks, ke) in zip(blk.q_ranges, blk.k_ranges):
        kk, vv = _bhsd(k[ks:ke]), _bhsd(v[ks:ke])
        if rep > 1:
            kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
        o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _bhsd(q[qs:qe]).contiguous(), kk.contiguous(), vv.contiguous(), 0.0, blk.causal,
            scale=scale)
        out[qs:qe] = o[0].permute(1, 0, 2)
        lse[:, qs:qe] = l[0]
    return out, lse


def _cpu_flash_block_backward(dout, q, k, v, out, lse, blk, scale):
    Lq, h, d = q.shape
    g = k.shape[1]
    rep = h // g
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (qs, qe), (ks, ke) in zip(blk.q_ranges, blk.k_ranges):
        m = ke - ks
        kk, vv = _bhsd(k[ks:ke]), _bhsd(v[ks:ke])
        if rep > 1:
            kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
        a, b, c = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _bhsd(dout[qs:qe].to(q.dtype)).contiguous(), _bhsd(q[qs:qe]).contiguous(),
            kk.contiguous(), vv.contiguous(), _bhsd(out[qs:qe].to(q.dtype)).contiguous(),
            lse[:, qs:qe].float().contiguous()[None], 0.0, blk.causal, scale=scale)
        dq[qs:qe] = a[0].permute(1, 0, 2)
        dk[ks:ke] = b[0].permute(1, 0, 2).reshape(m, g, rep, d).sum(2)
        dv[ks:ke] = c[0].permute(1, 0, 2).reshape(m, g, rep, d).sum(2)
    return dq, dk, dv


def _gather_rows(x, idx):
    return x if idx is None else x.index_select(0, idx)


def _flash_block_forward(q, k, v, blk, scale):
    qi, ki, cu_q, cu_k, mq, mk = blk.tensors(q.device)
    qg, kg, vg = _gather_rows(q, qi), _gather_rows(k, ki), _gather_rows(v, ki)
    o, lse = torch.ops.aten._flash_attention_forward(
        qg, kg, vg, cu_q, cu_k, mq, mk, 0.0, blk.causal, False, scale=scale)[:2]
    Lq, h, d = q.shape
    lse = _lse_to_hq(lse, cu_q, h, qg.shape[0])
    if qi is None:
        return o, lse  # kernel dtype; the ring merge accumulates in float32
    out = q.new_zeros((Lq, h, d))
    full = q.new_full((h, Lq), _NEG_INF, dtype=torch.float32)
    out.index_copy_(0, qi, o)
    full.index_copy_(1, qi, lse)
    return out, full


def _lse_to_hq(lse, cu_q, h, total_q):
    """flash varlen LSE -> ``[h, total_q]`` float32 (newer kernels already return that)."""
    lse = lse.float()
    if lse.dim() == 2 and lse.shape == (h, total_q):
        return lse
    if lse.dim() == 3:  # [n_seq, h, max_q] (older padded layout)
        parts = [lse[i, :, : int(cu_q[i + 1] - cu_q[i])] for i in range(lse.shape[0])]
        return torch.cat(parts, dim=1)
    raise RuntimeError(f"unexpected flash LSE shape {tuple(lse.shape)}")


def _flash_block_backward(dout, q, k, v, out, lse, blk, scale):
    qi, ki, cu_q, cu_k, mq, mk = blk.tensors(q.device)
    qg, kg, vg = _gather_rows(q, qi), _gather_rows(k, ki), _gather_rows(v, ki)
    dog = _gather_rows(dout, qi).to(q.dtype).contiguous()
    og = _gather_rows(out, qi).to(q.dtype).contiguous()
    lg = (lse if qi is None else lse.index_select(1, qi)).float().contiguous()
    rng = torch.zeros(2, dtype=torch.int64, device=q.device)
    unused = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dog, qg, kg, vg, og, lg, cu_q, cu_k, mq, mk, 0.0, blk.causal, rng, unused, scale=scale)
    if qi is None and ki is None:
        return dq, dk, dv  # kernel dtype; callers accumulate in float32 where needed
    Dq, Dk, Dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if qi is None:
        Dq.copy_(dq)
    else:
        Dq.index_copy_(0, qi, dq)
    if ki is None:
        Dk.copy_(dk)
        Dv.copy_(dv)
    else:
        Dk.index_copy_(0, ki, dk)
        Dv.index_copy_(0, ki, dv)
    return Dq, Dk, Dv


def _merge(out, lse, o_b, l_b):
    """Log-sum-exp merge of partial results (in place on ``out``; returns new lse)."""
    new = torch.logaddexp(lse, l_b)
    a = torch.exp(lse - new)
    b = torch.exp(l_b - new)
    a = torch.nan_to_num(a, nan=0.0)
    b = torch.nan_to_num(b, nan=0.0)
    out.mul_(a.t().unsqueeze(-1)).add_(o_b * b.t().unsqueeze(-1))
    return new


def merge_partials(outs: List[torch.Tensor], lses: List[torch.Tensor]) -> torch.Tensor:
    """Exact attention from partial results over disjoint key sets: ``outs[i] [n,h,d]`` with
    ``lses[i] [h,n]`` (``-inf`` where a part saw no key), merged by log-sum-exp in list order
    (the same merge as the ring's). Returns ``[n,h,d]`` in the accumulation dtype."""
    acc = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    out = outs[0].to(acc).clone()
    lse = lses[0].to(acc)
    for o, l in zip(outs[1:], lses[1:]):
        lse = _merge(out, lse, o.to(acc), l.to(acc))
    return out


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Attention of ``q [n,h,d]`` on every key of ``k/v [L,g,d]`` (no mask: decoding, every
    cached key precedes the query), through the block kernels: ``(out [n,h,d], lse [h,n])``
    in the accumulation dtype, ready for :func:`merge_partials`."""
    n, L = q.shape[0], k.shape[0]
    acc = _acc_dtype(q)
    if L == 0:
        return (q.new_zeros(q.shape, dtype=acc),
                q.new_full((q.shape[1], n), _NEG_INF, dtype=acc))
    out, lse = block_forward(q, k, v, VarlenBlock([(0, n)], [(0, L)], False, n, L), scale)
    return out.to(acc), lse.to(acc)


# ------------------------------------------------------------------ ring

class _P2P:
    """Post send-to-next / recv-from-prev on the ring group; ``wait()`` returns the buffer."""

    def __init__(self, send: torch.Tensor, ring_ranks: List[int], ring_rank: int, group):
        R = len(ring_ranks)
        self.buf = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, ring_ranks[(ring_rank + 1) % R], group),
               dist.P2POp(dist.irecv, self.buf, ring_ranks[(ring_rank - 1) % R], group)]
        self.reqs = dist.batch_isend_irecv(ops)

    def wait(self):
        for r in self.reqs:
            r.wait()
        return self.buf


class RingAttention(torch.autograd.Function):
    """Ring attention over ``ctx.blocks[src]`` for each source ring rank ``src``."""

    @staticmethod
    def forward(ctx, q, k, v, blocks, scale, ring_group, ring_ranks, ring_rank):
        R = len(blocks)
        kv = torch.stack([k, v]).contiguous() if R > 1 else (k, v)  # one buffer to send
        out = lse = None
        for step in range(R):
            comm = _P2P(kv, ring_ranks, ring_rank, ring_group) if step < R - 1 else None
            src = (ring_rank - step) % R
            blk = blocks[src]
            if blk is not None:
                o_b, l_b = block_forward(q, kv[0], kv[1], blk, scale)
                if out is None:
                    out, lse = (o_b, l_b) if R == 1 else (o_b.to(_acc_dtype(q)), l_b)
                else:
                    lse = _merge(out, lse, o_b, l_b)
            if comm is not None:
                kv = comm.wait()
        ctx.blocks, ctx.scale, ctx.group, ctx.ranks, ctx.rank = (
            blocks, scale, ring_group, ring_ranks, ring_rank)
        out = out.to(q.dtype)  # the kernels' backward takes the output in the input dtype
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        blocks, scale = ctx.blocks, ctx.scale
        R = len(blocks)
        acc = _acc_dtype(q)
        dout = dout.contiguous()
        delta = None
        if _backend(q) == "math":  # the kernels' backwards compute their own
            delta = (dout.to(acc) * out.to(acc)).sum(-1).t().contiguous()  # [h, L]
        if R == 1:  # plain (varlen) attention: no ring bookkeeping
            if blocks[0] is None:
                return (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                        None, None, None, None, None)
            dq, dk, dv = block_backward(dout, q, k, v, out, lse, delta, blocks[0], scale)
            return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                    None, None, None, None, None)
        kv = torch.stack([k, v]).contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dkv = None
        dkv_comm = None
        for step in range(R):
            kv_comm = _P2P(kv, ctx.ranks, ctx.rank, ctx.group) if step < R - 1 else None
            src = (ctx.rank - step) % R
            blk = blocks[src]
            contrib = None
            if blk is not None:
                dq_b, dk_b, dv_b = block_backward(dout, q, kv[0], kv[1], out, lse, delta, blk,
                                                  scale)
                dq += dq_b
                contrib = torch.stack([dk_b, dv_b])
            dkv = (dkv_comm.wait() if dkv_comm is not None
                   else torch.zeros((2,) + tuple(k.shape), dtype=acc, device=k.device))
            if contrib is not None:
                dkv = dkv + contrib
            if R > 1:
                dkv_comm = _P2P(dkv.contiguous(), ctx.ranks, ctx.rank, ctx.group)
            if kv_comm is not None:
                kv = kv_comm.wait()
        if dkv_comm is not None:
            dkv = dkv_comm.wait()
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype),
                None, None, None, None, None)


def ring_attention(q, k, v, blocks: List[Optional[VarlenBlock]], scale: float,
                   ring_group=None, ring_ranks=None, ring_rank: int = 0):
    """``q [L,h,d]``, ``k/v [L,g,d]`` (one ring shard) -> ``[L,h,d]``."""
    if ring_ranks is None:
        ring_ranks = [0]
    return RingAttention.apply(q, k, v, blocks, scale, ring_group, list(ring_ranks), ring_rank)


def varlen_block(cu_seqlens, causal: bool, length: int) -> VarlenBlock:
    """The single-rank block of a packed row: each sub-sequence attends to itself."""
    cu = [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
    ranges = [(a, b) for a, b in zip(cu[:-1], cu[1:]) if b > a]
    return VarlenBlock(ranges, list(ranges), causal, length, length)


def varlen_attention(q, k, v, cu_seqlens, causal: bool, scale: float):
    """Single-rank varlen attention through the same kernels (``[s,h,d]`` in and out)."""
    return ring_attention(q, k, v, [varlen_block(cu_seqlens, causal, q.shape[0])], scale)


# ------------------------------------------------------------------ Ulysses

class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.args = (group, scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, g):
        group, scatter_dim, gather_dim = ctx.args
        return _all_to_all(g.contiguous(), group, gather_dim, scatter_dim), None, None, None


def _all_to_all(x, group, scatter_dim, gather_dim):
    n = dist.get_world_size(group)
    send = torch.stack(x.tensor_split(n, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


def all_to_all(x, group, scatter_dim: int, gather_dim: int):
    """Autograd-aware all-to-all: split ``scatter_dim`` over the group, concatenate the
    received pieces along ``gather_dim`` (in group-rank order)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def attention_2d(q, k, v, blocks: List[Optional[VarlenBlock]], scale: float, groups):
    """MM-SP 2D attention of a local shard.

    ``q [s,h,d]``, ``k/v [s,g,d]`` (this rank's tokens) -> ``[s,h,d]``. ``blocks[src]`` is the
    layout's varlen call of this rank's ring shard against ring shard ``src``; ``groups`` an
    :class:`~megatron_longvila.parallel.groups.MMSPGroups`.
    """
    U = groups.ulysses_size
    h, g = q.shape[1], k.shape[1]
    if U > 1:
        if g % U != 0:
            assert U % g == 0, f"KV heads {g} and Ulysses size {U}"
            k = k.repeat_interleave(U // g, dim=1)
            v = v.repeat_interleave(U // g, dim=1)
        q = all_to_all(q, groups.ulysses_group, 1, 0)
        k = all_to_all(k, groups.ulysses_group, 1, 0)
        v = all_to_all(v, groups.ulysses_group, 1, 0)
    out = ring_attention(q, k, v, blocks, scale, groups.ring_group, groups.ring_global_ranks,
                         groups.ring_rank)
    if U > 1:
        out = all_to_all(out, groups.ulysses_group, 0, 1)
    return out
