"""MM-SP 2D attention (Ulysses x ring) against float64 reference math, in gloo processes."""

import pytest
import torch

from megatron_longvila.kernels.attention import varlen_attention
from megatron_longvila.parallel.layout import SequenceLayout
from dist import run_distributed

CU = [0, 13, 20, 41, 44]  # uneven documents


def reference(q, k, v, cu, causal=True, scale=None):
    """Dense float64 attention with document + causal masks (GQA by repetition)."""
    S, h, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    rep = h // k.shape[1]
    kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    doc = torch.zeros(S, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        doc[a:b] = i
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= torch.ones(S, S, dtype=torch.bool).tril()
    s = torch.einsum("qhd,khd->hqk", q, kk) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)


def _inputs(h, g, d, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    S = CU[-1]
    q = torch.randn(S, h, d, generator=gen, dtype=torch.float64)
    k = torch.randn(S, g, d, generator=gen, dtype=torch.float64)
    v = torch.randn(S, g, d, generator=gen, dtype=torch.float64)
    dout = torch.randn(S, h, d, generator=gen, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (q, k, v, dout))


# float64 runs the exact math path (tolerance 1e-10); float32 runs torch's CPU flash kernel
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _one_config(rank, world, ring, ring_type, h, g, d, dtype=torch.float64):
    from megatron.core import parallel_state
    from megatron_longvila.kernels.attention import attention_2d
    from megatron_longvila.parallel.groups import initialize_mmsp
    parallel_state.destroy_model_parallel()
    grp = initialize_mmsp(tp=1, cp=world, ring=ring, num_heads=h, num_kv_heads=g)
    layout = SequenceLayout(CU, ring=grp.ring_size, ulysses=grp.ulysses_size, ring_type=ring_type)
    q, k, v, dout = _inputs(h, g, d, dtype=dtype)
    T = layout.padded_len
    pad = lambda x, fill: torch.full((T,) + x.shape[1:], fill, dtype=x.dtype).index_copy(  # noqa
        0, layout.orig_to_padded, x)
    gen = torch.Generator().manual_seed(100 + rank)
    qp, kp, vp = (pad(x, 0.0) + layout.is_pad.view(-1, 1, 1) *
                  torch.randn((T,) + x.shape[1:], generator=gen, dtype=x.dtype)
                  for x in (q, k, v))  # random junk in the pads: must not leak
    dop = pad(dout, 0.0)
    idx = layout.shard_index[rank]
    ql, kl, vl = (x[idx].clone().requires_grad_() for x in (qp, kp, vp))
    out = attention_2d(ql, kl, vl, layout.attention_blocks(grp.ring_rank), d ** -0.5, grp)
    (out * dop[idx]).sum().backward()
    import torch.distributed as dist
    where = (grp.sp_rank, grp.ulysses_rank, grp.ring_rank,
             dist.get_process_group_ranks(grp.ulysses_group), grp.ring_global_ranks)
    return idx, out.detach(), ql.grad, kl.grad, vl.grad, layout.orig_to_padded, T, where


def _rank_fn(rank, world, configs, d):
    """Several layouts in one set of processes (Megatron's groups rebuilt for each)."""
    return [_one_config(rank, world, *c[:4], d, *c[4:]) for c in configs]


def _compare(res, h, g, d, dtype=torch.float64):
    T, o2p = res[0][6], res[0][5]
    full = [torch.zeros((T, hh, d), dtype=dtype) for hh in (h, h, g, g)]
    for idx, *ts, _, _, _ in res:
        for f, t in zip(full, ts):
            f[idx] = t
    q, k, v, dout = (x.clone().requires_grad_() for x in _inputs(h, g, d))
    ref = reference(q, k, v, CU)
    (ref * dout).sum().backward()
    for got, want, name in zip(full, (ref.detach(), q.grad, k.grad, v.grad),
                               ("out", "dq", "dk", "dv")):
        assert got.dtype == dtype
        torch.testing.assert_close(got[o2p].double(), want, rtol=TOL[dtype], atol=TOL[dtype],
                                   msg=name)


@pytest.mark.parametrize("world,configs", [
    # ring, ring_type, heads, kv_heads
    (2, [(1, "zigzag_ring_varlen", 4, 2),    # SP=2 Ulysses
         (2, "ring_varlen", 4, 2),           # SP=2 ring, contiguous
         (2, "zigzag_ring_varlen", 4, 1),    # SP=2 ring, zigzag, MQA
         (2, "zigzag_ring_varlen", 4, 2, torch.float32)]),  # CPU flash kernel
    (4, [(2, "zigzag_ring_varlen", 4, 1),    # SP=4 = 2 Ulysses x 2 ring, KV heads replicated
         (2, "ring_varlen", 4, 2),
         (2, "zigzag_ring_varlen", 4, 2, torch.float32)]),
], ids=["sp2", "sp4"])
def test_attention_2d_matches_float64_reference(world, configs):
    d = 8
    runs = run_distributed(_rank_fn, world, configs, d)
    for i, (ring, _, h, g, *dt) in enumerate(configs):
        _compare([r[i] for r in runs], h, g, d, *dt)
        # the groups are Megatron-Core's hierarchical CP groups: Ulysses = adjacent ranks
        # (inside a node), ring = ranks `ulysses` apart
        U = world // ring
        for rank, r in enumerate(runs):
            sp, u, rr, ug, rg = r[i][-1]
            assert (sp, u, rr) == (rank, rank % U, rank // U)
            assert ug == list(range(rr * U, rr * U + U)) and rg == [u + U * j for j in range(ring)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_single_rank(causal, dtype):
    q, k, v, dout = (x.clone().requires_grad_() for x in _inputs(4, 2, 8, seed=3, dtype=dtype))
    out = varlen_attention(q, k, v, torch.tensor(CU), causal, 8 ** -0.5)
    (out * dout).sum().backward()
    got = [out.detach(), q.grad, k.grad, v.grad]
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q2, k2, v2, CU, causal)
    (ref * dout.double()).sum().backward()
    for a, b in zip(got, [ref.detach(), q2.grad, k2.grad, v2.grad]):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("ring_type", ["ring_varlen", "zigzag_ring_varlen"])
@pytest.mark.parametrize("ring,ulysses,mult", [(2, 1, 1), (4, 1, 1), (2, 2, 2), (3, 1, 1)])
def test_layout_blocks_cover_exactly_the_causal_document_mask(ring_type, ring, ulysses, mult):
    """Union over all (query shard, key shard) blocks == causal document mask, no overlap."""
    lay = SequenceLayout(CU, ring, ulysses, ring_type, multiple_of=mult)
    T = lay.padded_len
    assert T % (ring * ulysses * mult) == 0 and lay.local_len * ring * ulysses == T
    if ring_type == "zigzag_ring_varlen":
        for (_, n, _, pn) in lay.docs:
            assert pn % (2 * ring) == 0 and pn - n < 2 * ring or n == 0
    else:
        assert T - CU[-1] < ring * ulysses * mult
    cover = torch.zeros(T, T, dtype=torch.long)
    for r in range(ring):
        for s in range(ring):
            blk = lay.attention_block(r, s)
            if blk is None:
                continue
            for (qs, qe), (ks, ke) in zip(blk.q_ranges, blk.k_ranges):
                qi = lay.ring_shard_index[r][qs:qe]
                ki = lay.ring_shard_index[s][ks:ke]
                m = torch.ones(qe - qs, ke - ks, dtype=torch.long)
                if blk.causal:
                    m = m.tril()
                cover[qi[:, None], ki[None, :]] += m
    doc = lay.doc_of
    want = ((doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()).long()
    assert torch.equal(cover, want)
    # every padded-row position is held by exactly one rank
    allidx = torch.cat(lay.shard_index)
    assert torch.equal(allidx.sort().values, torch.arange(T))
