#!/usr/bin/env python
"""One training step (forward, backward, optimizer) of LongVILA, ours and a Hugging Face
reference, on a packed video batch: tokens/s, MFU, peak memory. A worker of ``run_all.py``
(which starts it in a subprocess per phase), usable alone:

    python tools/benchmarks/bench_step.py --impl ours --lengths 8192,32768 --out rows.jsonl
    python tools/benchmarks/bench_step.py --impl hf --hf-attn docs --lengths 8192 --out rows.jsonl
    python tools/benchmarks/bench_step.py --impl ours --lengths "" \
        --ladder-lengths 32768,65536,98304,131072 --out rows.jsonl     # full recompute ladder
    python tools/benchmarks/bench_step.py --sanity --lengths "" --out rows.jsonl  # tiny + peak
    python tools/benchmarks/bench_step.py --smoke ...                   # CPU, tiny preset

Each result is one JSON line in ``--out`` (appended as soon as it is known, so a run killed at
its time limit keeps what it measured). CUDA out-of-memory is caught per configuration
("OOM"), memory freed, and the run goes on.

Recompute modes (both implementations, switched on the same model between runs):
``none``; ``vision`` = the vision tower's blocks are recomputed (Megatron full recompute of
the ViT / HF gradient checkpointing of SigLIP), the language model keeps its activations;
``full`` = every block of both. Each of ``--lengths`` tries the modes in the order given,
starting from the one the previous (shorter) length needed, until one fits; the
``--ladder-lengths`` then run in ``--ladder-mode`` (full) and stop at the first failure;
a ladder row is one long video sample (``--ladder-frames-per-sample 0``) unless told.

The reference (``--impl hf``): transformers' ``SiglipVisionModel`` (only the blocks that run,
SDPA), the same VILA projector module, ``Qwen2ForCausalLM`` (SDPA) with its own loss,
float32 parameters under ``torch.autocast(bfloat16)`` and ``torch.optim.AdamW(fused=True)``
(the Hugging Face Trainer's ``--bf16``), gradient clipping 1.0 as ours. ``--hf-attn``:
``sdpa`` = transformers' own handling of a packed row (it detects the restarting position
ids and builds a block-causal mask for SDPA); ``docs`` = transformers' SDPA attention
function called once per sub-sequence with no mask (is_causal kernels).
"""

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))

from megatron_longvila import cpu_compat, launch  # noqa: E402
from megatron_longvila.arguments import run_config_from_argv  # noqa: E402
from megatron_longvila.training.flops import step_flops  # noqa: E402
from megatron_longvila.training.step import BatchFeed, train_step  # noqa: E402
from megatron_longvila.training.train import build_model, build_optimizer, use_fused_adam  # noqa: E402
from megatron_longvila.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from megatron_longvila.evaluation.hf_reference import HFLongVILA  # noqa: E402
from megatron_longvila.evaluation.hf_reference import hf_modules as reference_modules  # noqa: E402

MODES = ("none", "vision", "full")


# ------------------------------------------------------------------ the workload

def video_batch(cfg, length, frames_per_sample=32, text_per_sample=256, prompt_len=16,
                seed=0, device="cpu", dtype=torch.float32):
    """A packed row of exactly ``length`` tokens: video samples of ``frames_per_sample``
    frames (the last one shortened to fit) each ``[prompt, frames * tokens_per_frame
    placeholders, answer]`` with ``text_per_sample`` text tokens, then padding as its own
    sub-sequence. Labels are the next token on the answers only.
    """
    g = torch.Generator().manual_seed(seed)
    T = cfg.tokens_per_frame
    tokens, labels, pos, seg, fps = [], [], [], [], []
    rest = length
    while rest >= T + text_per_sample:
        nf = min(frames_per_sample, (rest - text_per_sample) // T)
        ids = torch.randint(1, cfg.llm.vocab_size, (text_per_sample,), generator=g)
        sample = torch.cat([ids[:prompt_len], torch.full((nf * T,), IMAGE_TOKEN_INDEX),
                            ids[prompt_len:]])
        lab = torch.full_like(sample, IGNORE_INDEX)
        ans = prompt_len + nf * T
        lab[ans:-1] = sample[ans + 1:]
        tokens.append(sample), labels.append(lab), pos.append(torch.arange(len(sample)))
        seg.append(len(sample)), fps.append(nf)
        rest -= len(sample)
    if rest:
        tokens.append(torch.zeros(rest, dtype=torch.long))
        labels.append(torch.full((rest,), IGNORE_INDEX))
        pos.append(torch.arange(rest)), seg.append(rest), fps.append(0)
    cu = torch.tensor([0] + torch.tensor(seg).cumsum(0).tolist(), dtype=torch.int32)
    n_frames = sum(fps)
    frames = torch.randn(n_frames, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    labels = torch.cat(labels)[None]
    return dict(tokens=torch.cat(tokens)[None].to(device), labels=labels.to(device),
                position_ids=torch.cat(pos)[None].to(device),
                cu_seqlens=cu,  # stays on the host: the model reads its boundaries there
                frames=frames.to(device=device, dtype=dtype),
                frames_per_sample=torch.tensor(fps), seg_lens=seg, n_frames=n_frames,
                n_valid=int((labels != IGNORE_INDEX).sum()))


# ------------------------------------------------------------------ process setup

def init_dist(device):
    """A one-rank world (the project's bootstrap) with Megatron's parallel state."""
    from megatron.core import parallel_state
    launch.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def is_oom(e):
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "alloc_failed" in msg)


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ ours

class Ours:
    """The trainer's own step: ``training.train.build_model`` / ``build_optimizer`` from a
    RunConfig of the trainer's flags, and ``training.step.train_step`` on the batch."""
    name = "ours"
    optimizer = "megatron-core"

    def __init__(self, cfg, device, dtype, fused_adam=True, lr=1e-5, model_name="qwen2-1.5b"):
        self.run = run_config_from_argv(
            ["--model", model_name, "--seq-length", "8192", "--micro-batch-size", "1",
             "--train-iters", "10", "--lr", str(lr), "--min-lr", str(lr), "--clip-grad", "1.0",
             "--weight-decay", "0.0", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
             "--adam-eps", "1e-8"] + (["--bf16"] if dtype == torch.bfloat16 else []), 1)
        self.run.model.arch = cfg  # the benchmark's shapes
        self.setup = "trainer build_model/build_optimizer + train_step"
        self.ddp, self.model = build_model(self.run)
        self.opt, self.scheduler = build_optimizer(self.run, self.ddp)
        self.fused = fused_adam and device.type == "cuda" and use_fused_adam(self.opt)
        self.device, self.dtype = device, dtype
        self.n_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def set_recompute(self, mode):
        llm_cfg = self.model.config
        vis_cfg = self.model.vision_model.config
        full = mode == "full"
        llm_cfg.recompute_granularity = "full" if full else None
        llm_cfg.recompute_method = "uniform" if full else None
        llm_cfg.recompute_num_layers = 1 if full else None
        vis_cfg.recompute_granularity = "full" if mode in ("full", "vision") else None

    def step(self, b):
        """One trainer step on the packed row ``b``; returns its mean token loss."""
        feed = BatchFeed(iter([dict(b, num_samples=sum(1 for f in b["frames_per_sample"] if f))]),
                         self.run.arch, self.run.training.trainable)
        res = train_step(self.ddp, self.opt, self.scheduler, feed, num_micro_batches=1,
                         seq_length=int(b["tokens"].numel()), global_batch_size=1,
                         dtype=self.dtype)
        return torch.tensor(res.loss)

    def reset(self):
        self.ddp.zero_grad_buffer()
        self.opt.zero_grad()
        for p in self.model.parameters():
            p.grad = None


# ------------------------------------------------------------------ the Hugging Face reference

_DOC_BOUNDS = {"bounds": None}


def _sdpa_docs(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' SDPA attention, one call per sub-sequence (is_causal, no mask)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    bounds = _DOC_BOUNDS["bounds"] or [0, query.shape[2]]
    kwargs.pop("is_causal", None)
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        o, _ = sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b],
                                      value[:, :, a:b], None, *args, is_causal=True, **kwargs)
        outs.append(o)
    return torch.cat(outs, dim=1), None


def _register_sdpa_docs():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register("sdpa_docs", _sdpa_docs)
    AttentionMaskInterface.register("sdpa_docs", lambda *a, **k: None)


def hf_modules(cfg, attn="sdpa", device="cpu", dtype=torch.float32, seed=0):
    """Random transformers modules of our shapes (full-depth SigLIP, so weights map 1:1)."""
    impl = {"sdpa": "sdpa", "docs": "sdpa_docs", "eager": "eager"}[attn]
    if impl == "sdpa_docs":
        _register_sdpa_docs()
    return reference_modules(cfg, impl, "eager" if attn == "eager" else "sdpa", dtype=dtype,
                             device=device, seed=seed, use_cache=False,
                             max_position_embeddings=max(cfg.llm.max_position_embeddings, 1 << 20))


class HFReference(HFLongVILA):
    """The library's HF reference (VILA's data flow), the packed row in one call: its document
    mask comes from ``_sdpa_docs`` (attn "docs") or from transformers' packed-sequence
    detection on the restarting position ids (attn "sdpa"). Returns the mean token loss."""

    def __init__(self, cfg, lm, vt, proj, attn):
        super().__init__(cfg, lm, vt, proj, truncate_vision=True)
        self.attn = attn

    def forward(self, tokens, position_ids, frames, labels, seg_lens):
        # read by _sdpa_docs, also when gradient checkpointing recomputes in the backward
        _DOC_BOUNDS["bounds"] = [0] + torch.tensor(seg_lens).cumsum(0).tolist()
        out = super().forward(tokens, position_ids, frames, labels, per_sample=False)
        return out.output.sum() / out.loss_mask.sum()


class HF:
    def __init__(self, cfg, device, dtype, attn="docs", lr=1e-5):
        lm, vt, proj = hf_modules(cfg, attn, device)  # float32 master weights
        self.ref = HFReference(cfg, lm, vt, proj, attn).train()
        self.name = f"hf ({'sdpa, packed mask' if attn == 'sdpa' else 'sdpa per document'})"
        self.params = [p for p in self.ref.parameters() if p.requires_grad]
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                                     weight_decay=0.0, fused=fused)
        self.fused = fused
        self.device, self.dtype = device, dtype
        self.n_params = sum(p.numel() for p in self.params)

    def set_recompute(self, mode):
        kw = dict(gradient_checkpointing_kwargs={"use_reentrant": False})
        for m, on in ((self.ref.vt, mode in ("vision", "full")), (self.ref.lm, mode == "full")):
            m.gradient_checkpointing_enable(**kw) if on else m.gradient_checkpointing_disable()

    def loss(self, b):
        with torch.autocast(self.device.type, dtype=self.dtype,
                            enabled=self.dtype != torch.float32):
            return self.ref(b["tokens"], b["position_ids"], b["frames"], b["labels"],
                            b["seg_lens"])

    def step(self, b):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        return loss

    def reset(self):
        self.opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------ timing

def time_steps(runner, batch, warmup, steps, device, deadline=None):
    """Per-step times of ``steps`` timed steps after ``warmup`` (stops early, keeping at
    least one timed step, when the deadline comes). On CUDA each step is bracketed by events
    and the host waits only after the last one, so no sync is added between steps."""
    times, events, loss = [], [], None
    for i in range(warmup + steps):
        if i >= warmup + 1 and deadline is not None and time.time() > deadline:
            break
        if device.type == "cuda":
            a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            loss = runner.step(batch)
            e.record()
            if i < warmup:
                e.synchronize()  # warm-up: allocations, autotuning, lazy optimizer state
            else:
                events.append((a, e))
        else:
            t = time.perf_counter()
            loss = runner.step(batch)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    if events:
        events[-1][1].synchronize()
        times = [a.elapsed_time(e) / 1e3 for a, e in events]
    return times, float(loss.detach())


def measure(runner, cfg, length, mode, args, device, peak_tflops, deadline=None):
    row = dict(kind="step", impl=runner.name, tokens=length, recompute=mode)
    batch = None
    try:
        runner.set_recompute(mode)
        fake = int(os.environ.get("BENCH_FAKE_OOM_ABOVE", "0"))
        if fake and length > fake and mode != "full":  # tests: exercise the OOM handling
            raise torch.cuda.OutOfMemoryError(f"fake OOM above {fake} tokens")
        if fake and length > 2 * fake:
            raise torch.cuda.OutOfMemoryError(f"fake OOM above {2 * fake} tokens")
        batch = video_batch(cfg, length, args.frames_per_sample, args.text_per_sample,
                            device=device, dtype=torch.float32 if runner.name != "ours"
                            else args.dtype)
        row.update(frames=batch["n_frames"], samples=sum(1 for f in batch["frames_per_sample"]
                                                         if f > 0))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        times, loss = time_steps(runner, batch, args.warmup, args.steps, device, deadline)
        med = statistics.median(times)
        # useful model FLOPs, the same for both implementations: lm_head on labelled rows
        fl = step_flops(cfg, batch["seg_lens"], batch["n_frames"],
                        labelled_tokens=batch["n_valid"])
        row.update(status="ok", steps=len(times), step_s=med,
                   step_s_min=min(times), step_s_max=max(times), wall_s=time.time() - t0,
                   tokens_per_s=length / med, model_tflop_per_step=fl["total"] / 1e12,
                   tflops=fl["total"] / med / 1e12, loss=loss,
                   flops_parts={k: v / 1e12 for k, v in fl.items()}, fused_adam=runner.fused,
                   optimizer=getattr(runner, "optimizer", "torch AdamW"))
        if peak_tflops:
            row["mfu"] = fl["total"] / med / 1e12 / peak_tflops
        if device.type == "cuda":
            row.update(peak_mem_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                       peak_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30)
        if not math.isfinite(loss):
            row["status"] = "non-finite loss"
    except Exception as e:  # noqa: BLE001 - OOM is a result; anything else is reported
        if is_oom(e):
            row["status"] = "OOM"
        else:
            row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del batch
    runner.reset()
    free(device)
    return row


# ------------------------------------------------------------------ sanity + peak

def matmul_peak(device, n=8192, reps=7, inner=20):
    if device.type != "cuda":
        n, inner = 256, 2
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    rates = []
    for _ in range(reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(inner):
                a @ b
            e.record()
            e.synchronize()
            dt = s.elapsed_time(e) / 1e3
        else:
            t = time.perf_counter()
            for _ in range(inner):
                a @ b
            dt = time.perf_counter() - t
        rates.append(2 * n ** 3 * inner / dt / 1e12)
    return dict(kind="peak", n=n, tflops=statistics.median(rates), tflops_all=rates)


def sanity(device):
    """The tiny model, forward + backward in bf16 on the device: finite loss and gradients."""
    from megatron_longvila.models import LongVILAModel, get_preset
    cfg = get_preset("tiny")
    cpu_compat.model_parallel_seed(0)
    model = LongVILAModel(cfg, dtype=torch.bfloat16)
    if device.type == "cuda":
        model.cuda()
    b = video_batch(cfg, 256, frames_per_sample=8, text_per_sample=32, device=device,
                    dtype=torch.bfloat16)
    t = time.perf_counter()
    losses = model(b["tokens"], b["position_ids"], b["frames"], b["labels"], b["cu_seqlens"],
                   b["frames_per_sample"]).output
    loss = losses.sum() / b["n_valid"]
    loss.backward()
    sync(device)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    ok_grads = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    row = dict(kind="sanity", model="tiny", dtype="bf16", tokens=256, frames=b["n_frames"],
               loss=float(loss.detach()), grads_finite=ok_grads, n_grads=len(grads),
               seconds=time.perf_counter() - t,
               status="ok" if ok_grads and math.isfinite(float(loss)) else "FAILED")
    del model
    free(device)
    return row


def env_row(device):
    import megatron.core
    import transformers
    row = dict(kind="env", torch=torch.__version__, megatron_core=megatron.core.__version__,
               transformers=transformers.__version__, python=sys.version.split()[0],
               device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               date_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
    if device.type == "cuda":
        row.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpu_mem_gib=torch.cuda.get_device_properties(0).total_memory / 2 ** 30)
    return row


# ------------------------------------------------------------------ main

def emit(path, row):
    print(json.dumps(row), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _cascade(runner, cfg, L, modes, start_mode, args, device, deadline, last, ladder):
    """Try ``modes[start_mode:]`` at length L until one fits; returns (row or None, index)."""
    steps, warmup = (args.ladder_steps, 1) if ladder else (args.steps, args.warmup)
    for i in range(start_mode, len(modes)):
        mode = modes[i]
        if deadline is not None and last is not None:
            est = last[1] * (L / last[0]) ** 1.5 * (warmup + steps) + 10
            if time.time() + est > deadline:
                emit(args.out, dict(kind="step", impl=runner.name, tokens=L, recompute=mode,
                                    ladder=ladder,
                                    status=f"skipped: budget (needs ~{est:.0f} s)"))
                return None, -1
        a = argparse.Namespace(**vars(args))
        a.steps, a.warmup = steps, warmup
        if ladder:  # one video sample fills the row (0: as many frames as fit)
            a.frames_per_sample = args.ladder_frames_per_sample or 10 ** 9
        row = measure(runner, cfg, L, mode, a, device, args.peak_tflops, deadline)
        row["ladder"] = ladder
        emit(args.out, row)
        if row["status"] == "ok":
            return row, i
        if row["status"] != "OOM":
            return None, -1
    return None, len(modes)


def run(args):
    cpu_compat.enable()  # an entry point: the CPU shims (no-op with CUDA)
    device = torch.device(args.device)
    if args.smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    init_dist(device)
    if args.sanity:  # each piece reports its own failure; the steps run regardless
        for kind, fn in (("env", env_row), ("sanity", sanity), ("peak", matmul_peak)):
            try:
                row = fn(device)
            except Exception as e:  # noqa: BLE001
                row = dict(kind=kind, status=f"FAILED: {type(e).__name__}: {str(e)[:300]}")
                free(device)
            emit(args.out, row)
            if kind == "peak" and "tflops" in row:
                args.peak_tflops = args.peak_tflops or row["tflops"]
    lengths = [int(x) for x in args.lengths.split(",") if x]
    ladder = [int(x) for x in args.ladder_lengths.split(",") if x]
    if not lengths and not ladder:
        return
    from megatron_longvila.models import get_preset
    cfg = get_preset(args.model)
    modes = args.recompute.split(",")
    for m in modes + [args.ladder_mode]:
        if m not in MODES:
            raise SystemExit(f"recompute mode {m!r} is not one of {MODES}")
    deadline = args.deadline or None
    try:
        if args.impl == "ours":
            runner = Ours(cfg, device, args.dtype, fused_adam=not args.no_fused_adam,
                          model_name=args.model)
        else:
            runner = HF(cfg, device, args.dtype, attn=args.hf_attn)
    except Exception as e:  # noqa: BLE001
        status = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
        name = args.impl if args.impl == "ours" else f"hf ({args.hf_attn})"
        for L, lad in [(L, False) for L in lengths] + [(L, True) for L in ladder]:
            emit(args.out, dict(kind="step", impl=name, tokens=L, ladder=lad,
                                recompute=args.ladder_mode if lad else modes[0],
                                status=f"build failed: {status}"))
        return
    emit(args.out, dict(kind="model", impl=runner.name, trainable_params=runner.n_params,
                        fused_adam=runner.fused, setup=getattr(runner, "setup", "bench"),
                        optimizer=getattr(runner, "optimizer", "torch AdamW")))
    start, last = 0, None
    for L in lengths:  # (b)/(c): each length in the cheapest recompute mode that fits
        row, idx = _cascade(runner, cfg, L, modes, start, args, device, deadline, last, False)
        if row is None:
            if idx == -1:
                break
            continue
        start, last = idx, (L, row["step_s"])
    for L in ladder:  # (d): longest length with full recompute, stop at the first failure
        row, idx = _cascade(runner, cfg, L, [args.ladder_mode], 0, args, device, deadline,
                            last, True)
        if row is None:
            break
        last = (L, row["step_s"])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON lines file to append to")
    p.add_argument("--impl", choices=("ours", "hf"), default="ours")
    p.add_argument("--hf-attn", choices=("sdpa", "docs"), default="docs")
    p.add_argument("--model", default="qwen2-1.5b")
    p.add_argument("--lengths", default="8192,32768")
    p.add_argument("--recompute", default="none,vision,full",
                   help="modes to try in order for --lengths")
    p.add_argument("--ladder-lengths", default="",
                   help="after --lengths: lengths with --ladder-mode, stop at the first failure")
    p.add_argument("--ladder-mode", default="full")
    p.add_argument("--ladder-frames-per-sample", type=int, default=0,
                   help="ladder rows: frames per sample (0: one sample fills the row)")
    p.add_argument("--ladder-steps", type=int, default=2, help="timed steps per rung (+1 warm-up)")
    p.add_argument("--frames-per-sample", type=int, default=32)
    p.add_argument("--text-per-sample", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="measured bf16 matmul rate, for MFU")
    p.add_argument("--deadline", type=float, default=0.0, help="unix time to stop by")
    p.add_argument("--no-fused-adam", action="store_true")
    p.add_argument("--sanity", action="store_true", help="tiny model fwd+bwd + matmul peak")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true",
                   help="CPU-sized: tiny preset, tiny lengths (sets --model tiny)")
    args = p.parse_args(argv)
    args.dtype = torch.bfloat16
    if args.smoke:  # Megatron-Core's bf16 optimizer needs CUDA: the CPU smoke trains in fp32
        args.dtype = torch.float32
        args.model = "tiny"
        args.frames_per_sample, args.text_per_sample = 4, 24
    return args


if __name__ == "__main__":
    run(parse())
