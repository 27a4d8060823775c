#!/usr/bin/env python
"""Benchmark of MM-SP attention (not a test). Needs torch only.

    python tools/benchmarks/bench_attention.py --out DIR            # GPU: kernels + paper table
    python tools/benchmarks/bench_attention.py --out DIR --paper-only   # CPU is fine
    python tools/benchmarks/bench_attention.py --out DIR --check    # GPU: kernel/ring exactness
    torchrun --nproc-per-node 2 tools/benchmarks/bench_attention.py --out DIR --check-dist

1. Attention at SP=1 (our path: cuDNN SDPA per long document, one varlen
   ``aten._flash_attention_forward`` call for the short ones; and flash varlen alone,
   MMSP_CUDNN_MIN_LEN=0) against torch SDPA with the cuDNN and the flash backends on
   the same shapes (causal, bf16, 8k-128k tokens; one document, and a packed row of uneven
   documents, which SDPA runs document by document). TFLOP/s count 4*d*h per attended pair
   forward and 2.5x that backward.
2. Communication volume per layer and per rank of each MM-SP layout, computed on paper, for
   8-256 GPUs (Ulysses only, ring only, 2D with Ulysses inside an 8-GPU node), and of stage 1
   (visual embeddings routed to their owners vs an all-gather).
3. Balance (max/mean over ranks) of a skewed packed batch - one long video, many short
   clips - per layout: visual tokens encoded, LM tokens, causal attention FLOPs.

Writes ``DIR/attention.csv``, ``DIR/comm_volume.csv`` and ``DIR/report.txt``; prints tables.
"""

import argparse
import csv
import math
import os
import sys
import time

import torch

from megatron_longvila.kernels.attention import (block_backward, block_forward,  # noqa: E402
                                                  ring_attention, varlen_block, _merge)
from megatron_longvila.parallel.balance import balance_report  # noqa: E402
from megatron_longvila.parallel.layout import SequenceLayout  # noqa: E402


# ------------------------------------------------------------------ helpers

def causal_pairs(lens):
    return sum(n * (n + 1) // 2 for n in lens)


def doc_lengths(total, kind, seed=0):
    if kind == "1doc":
        return [total]
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(6, generator=g) + 0.2  # 6 uneven documents
    lens = (w / w.sum() * total).long().tolist()
    lens[-1] += total - sum(lens)
    return lens


def timeit(fn, iters, device):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def table(rows, cols):
    w = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    out = ["  ".join(c.rjust(x) for c, x in zip(cols, w))]
    out += ["  ".join(str(r[c]).rjust(x) for c, x in zip(cols, w)) for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------ 1. kernels at SP=1

def bench_kernels(args, device):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h, g, d = args.heads, args.kv_heads, args.head_dim
    scale = d ** -0.5
    sizes = [int(x) for x in args.seqlens.split(",")]
    if device.type != "cuda":
        sizes = [s // 32 for s in sizes[:2]]  # CPU: a smoke run of the math path
    rows = []
    for S in sizes:
        for kind in ("1doc", "6docs"):
            lens = doc_lengths(S, kind)
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
            q = torch.randn(S, h, d, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(S, g, d, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(S, g, d, device=device, dtype=dtype, requires_grad=True)
            do = torch.randn(S, h, d, device=device, dtype=dtype)
            blk = varlen_block(cu, True, S)
            flops_f = 4.0 * d * h * causal_pairs(lens)
            # SDPA baselines see [1, heads, s, d] per document, KV heads expanded beforehand
            qt = q.detach().permute(1, 0, 2)[None]
            kt = k.detach().repeat_interleave(h // g, 1).permute(1, 0, 2)[None]
            vt = v.detach().repeat_interleave(h // g, 1).permute(1, 0, 2)[None]
            qt, kt, vt = (x.contiguous().requires_grad_() for x in (qt, kt, vt))
            dot = do.permute(1, 0, 2)[None].contiguous()
            bounds = cu.tolist()

            def ours_f():
                with torch.no_grad():
                    ring_attention(q, k, v, [blk], scale)

            def ours_fb():
                out = ring_attention(q, k, v, [blk], scale)
                torch.autograd.grad(out, (q, k, v), do)

            def sdpa(backend, bwd):
                def run():
                    with sdpa_kernel([backend]):
                        outs = []
                        with torch.set_grad_enabled(bwd):
                            for a, b in zip(bounds[:-1], bounds[1:]):
                                outs.append(F.scaled_dot_product_attention(
                                    qt[:, :, a:b], kt[:, :, a:b], vt[:, :, a:b], is_causal=True,
                                    scale=scale))
                        if bwd:
                            o = torch.cat(outs, 2)
                            torch.autograd.grad(o, (qt, kt, vt), dot)
                return run

            def no_cudnn(fn):
                def run():
                    old = os.environ.get("MMSP_CUDNN_MIN_LEN")
                    os.environ["MMSP_CUDNN_MIN_LEN"] = "0"
                    try:
                        fn()
                    finally:
                        if old is None:
                            os.environ.pop("MMSP_CUDNN_MIN_LEN")
                        else:
                            os.environ["MMSP_CUDNN_MIN_LEN"] = old
                return run

            methods = [("ours (SP=1 path)", ours_f, ours_fb)]
            if device.type == "cuda":
                methods.append(("ours, flash varlen only", no_cudnn(ours_f), no_cudnn(ours_fb)))
            if device.type == "cuda":
                methods += [("sdpa cudnn", sdpa(SDPBackend.CUDNN_ATTENTION, False),
                             sdpa(SDPBackend.CUDNN_ATTENTION, True)),
                            ("sdpa flash", sdpa(SDPBackend.FLASH_ATTENTION, False),
                             sdpa(SDPBackend.FLASH_ATTENTION, True))]
            else:
                methods += [("sdpa math", sdpa(SDPBackend.MATH, False),
                             sdpa(SDPBackend.MATH, True))]
            for name, f, fb in methods:
                iters = max(1, min(20, int(2e14 / max(flops_f, 1))))
                row = dict(tokens=S, docs=kind, method=name)
                try:
                    tf = timeit(f, iters, device)
                    tfb = timeit(fb, iters, device)
                    row.update(fwd_ms=f"{tf * 1e3:.2f}", fwd_tflops=f"{flops_f / tf / 1e12:.1f}",
                               fwdbwd_ms=f"{tfb * 1e3:.2f}",
                               fwdbwd_tflops=f"{3.5 * flops_f / tfb / 1e12:.1f}")
                except Exception as e:  # noqa: BLE001 - a backend may refuse a shape
                    row.update(fwd_ms="n/a", fwd_tflops="n/a", fwdbwd_ms="n/a",
                               fwdbwd_tflops=f"n/a: {type(e).__name__}")
                rows.append(row)
                print(table([row], list(row)).splitlines()[-1], flush=True)
            del q, k, v, qt, kt, vt
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ 2. comm volume on paper

def comm_rows(args):
    """Bytes per rank for one transformer layer (attention only), forward and backward."""
    S, h, g, d, b = args.paper_seq, args.heads, args.kv_heads, args.head_dim, 2
    rows = []
    MB = 1 << 20
    for sp in (8, 16, 32, 64, 128, 256):
        layouts = [("ulysses", sp, 1), ("ring", 1, sp)]
        if sp > args.gpus_per_node:
            layouts.append((f"2d (U={args.gpus_per_node} in node)", args.gpus_per_node,
                            sp // args.gpus_per_node))
        for name, U, R in layouts:
            s = S / sp
            if h % U or (g % U and U % g):
                rows.append(dict(gpus=sp, layout=name, U=U, R=R, a2a_fwd_MB="n/a (heads)",
                                 p2p_fwd_MB="-", fwd_bwd_MB="-", inter_node_MB="-"))
                continue
            gq = max(g, U)  # KV heads after replication for Ulysses
            a2a = (U - 1) / U * s * d * (2 * h + 2 * gq) * b           # q, k, v, out
            L = S / R
            kv_local = 2 * L * (gq / U) * d                             # elements of K and V
            p2p_f = (R - 1) * kv_local * b
            # backward: KV goes round again, and (ring > 1) the fp32 dKV goes round R times
            p2p_b = (R - 1) * kv_local * b + (R * kv_local * 4 if R > 1 else 0)
            total = 2 * a2a + p2p_f + p2p_b                              # a2a bwd = a2a fwd
            intra_u = U <= args.gpus_per_node
            inter = (0 if intra_u else 2 * a2a) + \
                (p2p_f + p2p_b if (U * R > args.gpus_per_node and R > 1) else 0)
            rows.append(dict(gpus=sp, layout=name, U=U, R=R, a2a_fwd_MB=f"{a2a / MB:.1f}",
                             p2p_fwd_MB=f"{p2p_f / MB:.1f}", fwd_bwd_MB=f"{total / MB:.1f}",
                             inter_node_MB=f"{inter / MB:.1f}"))
    return rows


def stage1_rows(args):
    V, H, b = args.visual_tokens, args.llm_hidden, 2
    MB = 1 << 20
    rows = []
    for sp in (8, 16, 32, 64, 128, 256):
        route = V / sp * (sp - 1) / sp * H * b          # each token crosses at most once
        gather = V * (sp - 1) / sp * H * b               # every rank receives every token
        rows.append(dict(gpus=sp, route_recv_MB=f"{route / MB:.1f}",
                         allgather_recv_MB=f"{gather / MB:.1f}", ratio=f"{gather / route:.0f}x"))
    return rows


def balance_rows(args):
    """One long video (256 frames) and 15 short clips (2-8 frames) in one packed row."""
    from megatron_longvila.constants import IMAGE_TOKEN_INDEX
    tpf, frames, parts, cu = 196, [256] + [2 + (3 * i) % 7 for i in range(15)], [], [0]
    for nf in frames:
        n_text = 300
        parts.append(torch.cat([torch.ones(20, dtype=torch.long),
                                torch.full((nf * tpf,), IMAGE_TOKEN_INDEX),
                                torch.ones(n_text, dtype=torch.long)]))
        cu.append(cu[-1] + len(parts[-1]))
    tokens = torch.cat(parts)
    rows = []
    for sp in (8, 16, 32, 64):
        for ring_type in ("ring_varlen", "zigzag_ring_varlen"):
            for ring in sorted({sp, max(1, sp // args.gpus_per_node)}):
                if ring == 1 and ring_type == "zigzag_ring_varlen":
                    continue
                rep = balance_report(tokens, cu, sum(frames), tpf, sp, ring, ring_type,
                                     args.heads, args.head_dim)
                r = rep.ratios()
                rows.append(dict(gpus=sp, layout=ring_type if ring > 1 else "ulysses",
                                 U=sp // ring, R=ring, tokens=len(tokens),
                                 visual=f"{r['visual_tokens']:.3f}",
                                 lm_tokens=f"{r['text_tokens']:.3f}",
                                 attn_flops=f"{r['attn_flops']:.3f}"))
    return rows


# ------------------------------------------------------------------ exactness checks (GPU)

def _reference(q, k, v, cu, dout):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    S, h, d = q.shape
    rep = h // k.shape[1]
    doc = torch.zeros(S, dtype=torch.long, device=q.device)
    for i, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        doc[a:b] = i
    mask = (doc[:, None] == doc[None]) & torch.ones(S, S, dtype=torch.bool,
                                                    device=q.device).tril()
    s = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(rep, 1)) * d ** -0.5
    o = torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, float("-inf")).softmax(-1),
                     v.repeat_interleave(rep, 1))
    o.backward(dout.double())
    return o.detach(), q.grad, k.grad, v.grad


def _err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def check(device, lines):
    for lim in ("0", "64"):  # 0: flash varlen only; 64: cuDNN for every segment of >= 64
        os.environ["MMSP_CUDNN_MIN_LEN"] = os.environ["MMSP_CUDNN_BWD_MIN_LEN"] = lim
        lines.append(f"-- MMSP_CUDNN_MIN_LEN=MMSP_CUDNN_BWD_MIN_LEN={lim}")
        _check(device, lines)
    os.environ.pop("MMSP_CUDNN_MIN_LEN")
    os.environ.pop("MMSP_CUDNN_BWD_MIN_LEN")


def _check(device, lines):
    torch.manual_seed(0)
    cu = [0, 300, 357, 1000, 1203]
    S, h, g, d = cu[-1], 8, 2, 64
    q, k, v, do = (torch.randn(S, n, d, device=device, dtype=torch.bfloat16)
                   for n in (h, g, g, h))
    ref = _reference(q, k, v, cu, do)
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out = ring_attention(qq, kk, vv, [varlen_block(cu, True, S)], d ** -0.5)
    out.backward(do)
    errs = [_err(x, r) for x, r in zip((out, qq.grad, kk.grad, vv.grad), ref)]
    lines.append(f"SP=1 varlen flash vs float64: rel err out/dq/dk/dv = "
                 + " ".join(f"{e:.2e}" for e in errs))
    assert max(errs) < 2e-2, errs
    # ring blocks (gathered rows, LSE merge, backward with the final out/lse), ring simulated
    for ring_type in ("ring_varlen", "zigzag_ring_varlen"):
        R = 4
        lay = SequenceLayout(cu, ring=R, ulysses=1, ring_type=ring_type)
        T = lay.padded_len
        pad = lambda x: torch.zeros((T,) + x.shape[1:], dtype=x.dtype, device=device).index_copy(  # noqa
            0, lay.orig_to_padded.to(device), x)
        qp, kp, vp, dop = pad(q), pad(k), pad(v), pad(do)
        outs, dq, dk, dv = {}, torch.zeros(T, h, d, device=device), \
            torch.zeros(T, g, d, device=device), torch.zeros(T, g, d, device=device)
        for r in range(R):
            iq = lay.ring_shard_index[r].to(device)
            o = l = None
            for src in range(R):
                blk = lay.attention_block(r, src)
                if blk is None:
                    continue
                ik = lay.ring_shard_index[src].to(device)
                ob, lb = block_forward(qp[iq], kp[ik], vp[ik], blk, d ** -0.5)
                if o is None:
                    o, l = ob.float(), lb
                else:
                    l = _merge(o, l, ob, lb)
            o16 = o.to(torch.bfloat16)
            for src in range(R):
                blk = lay.attention_block(r, src)
                if blk is None:
                    continue
                ik = lay.ring_shard_index[src].to(device)
                a, b_, c = block_backward(dop[iq], qp[iq], kp[ik], vp[ik], o16, l, None, blk,
                                          d ** -0.5)
                dq[iq] += a.float()
                dk[ik] += b_.float()
                dv[ik] += c.float()
            outs[r] = (iq, o)
        full = torch.zeros(T, h, d, device=device)
        for iq, o in outs.values():
            full[iq] = o
        o2p = lay.orig_to_padded.to(device)
        errs = [_err(x[o2p], r) for x, r in zip((full, dq, dk, dv), ref)]
        lines.append(f"ring={R} {ring_type} flash blocks vs float64: rel err out/dq/dk/dv = "
                     + " ".join(f"{e:.2e}" for e in errs))
        assert max(errs) < 2e-2, errs


def check_dist(lines):
    """torchrun on >= 2 GPUs: attention_2d over NCCL (Ulysses x ring) vs float64."""
    import torch.distributed as dist
    from types import SimpleNamespace
    from megatron_longvila.kernels.attention import attention_2d
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    device = torch.device("cuda")
    for U, R in sorted({(1, world), (world, 1), (max(1, world // 2), min(world, 2))}):
        if U * R != world:
            continue
        ug = [dist.new_group([rr * U + u for u in range(U)]) for rr in range(R)]
        rg = [dist.new_group([rr * U + u for rr in range(R)]) for u in range(U)]
        ur, rr = rank % U, rank // U
        grp = SimpleNamespace(ulysses_size=U, ulysses_group=ug[rr], ring_group=rg[ur],
                              ring_global_ranks=[x * U + ur for x in range(R)], ring_rank=rr)
        torch.manual_seed(0)
        cu = [0, 3000, 3571, 10000, 12030]
        S, h, g, d = cu[-1], 8, 2, 64
        q, k, v, do = (torch.randn(S, n, d, device=device, dtype=torch.bfloat16)
                       for n in (h, g, g, h))
        for ring_type in ("ring_varlen", "zigzag_ring_varlen"):
            lay = SequenceLayout(cu, R, U, ring_type)
            T = lay.padded_len
            pad = lambda x: torch.zeros((T,) + x.shape[1:], dtype=x.dtype, device=device).index_copy(  # noqa
                0, lay.orig_to_padded.to(device), x)
            idx = lay.shard_index[rank].to(device)
            ql, kl, vl = (pad(x)[idx].clone().requires_grad_() for x in (q, k, v))
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = attention_2d(ql, kl, vl, lay.attention_blocks(rr), d ** -0.5, grp)
            out.backward(pad(do)[idx])
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            parts = []
            for x in (out, ql.grad, kl.grad, vl.grad):
                bufs = [torch.empty_like(x) for _ in range(world)]
                dist.all_gather(bufs, x.detach().contiguous())
                full = torch.zeros((T,) + x.shape[1:], dtype=x.dtype, device=device)
                for c, bb in enumerate(bufs):
                    full[lay.shard_index[c].to(device)] = bb
                parts.append(full[lay.orig_to_padded.to(device)])
            if rank == 0:
                ref = _reference(q, k, v, cu, do)
                errs = [_err(x, r) for x, r in zip(parts, ref)]
                lines.append(f"NCCL world={world} U={U} R={R} {ring_type}: rel err "
                             f"out/dq/dk/dv = " + " ".join(f"{e:.2e}" for e in errs) +
                             f"  ({dt * 1e3:.0f} ms incl. first-call setup)")
                assert max(errs) < 2e-2, errs
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------ main

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seqlens", default="8192,16384,32768,65536,131072")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--paper-seq", type=int, default=1 << 20, help="global tokens for the paper")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--visual-tokens", type=int, default=1024 * 196,
                   help="stage-1 visual tokens per micro-batch (paper)")
    p.add_argument("--llm-hidden", type=int, default=4096)
    p.add_argument("--paper-only", action="store_true")
    p.add_argument("--check", action="store_true", help="GPU kernel exactness checks")
    p.add_argument("--check-dist", action="store_true", help="under torchrun, NCCL 2D attention")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lines = []
    if args.check_dist:
        check_dist(lines)
        if lines:
            print("\n".join(lines))
            with open(os.path.join(args.out, "check_dist.txt"), "w") as f:
                f.write("\n".join(lines) + "\n")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.check:
        check(device, lines)
    if not args.paper_only and not args.check:
        print(f"attention at SP=1 on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}"
              f", torch {torch.__version__}, h={args.heads} kv={args.kv_heads} d={args.head_dim}")
        rows = bench_kernels(args, device)
        cols = ["tokens", "docs", "method", "fwd_ms", "fwd_tflops", "fwdbwd_ms", "fwdbwd_tflops"]
        t = table(rows, cols)
        lines += ["== attention, causal, SP=1 ==", t]
        with open(os.path.join(args.out, "attention.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, cols)
            w.writeheader()
            w.writerows(rows)
    crow = comm_rows(args)
    ccols = ["gpus", "layout", "U", "R", "a2a_fwd_MB", "p2p_fwd_MB", "fwd_bwd_MB", "inter_node_MB"]
    lines += [f"== communication per layer per rank (paper): {args.paper_seq} tokens, "
              f"h={args.heads} kv={args.kv_heads} d={args.head_dim}, bf16 (dkv in fp32) ==",
              table(crow, ccols)]
    srow = stage1_rows(args)
    lines += [f"== stage 1 per micro-batch per rank (paper): {args.visual_tokens} visual tokens, "
              f"hidden {args.llm_hidden} ==", table(srow, list(srow[0]))]
    brow = balance_rows(args)
    lines += ["== balance max/mean over ranks: 1 long video + 15 short clips (196 tok/frame) ==",
              table(brow, list(brow[0]))]
    with open(os.path.join(args.out, "comm_volume.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ccols)
        w.writeheader()
        w.writerows(crow)
    report = "\n".join(lines)
    print(report)
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write(report + "\n")


if __name__ == "__main__":
    main()
