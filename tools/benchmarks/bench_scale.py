#!/usr/bin/env python
"""Issue 9: MM-SP on several GPUs, in one call. Not a test.

    python tools/benchmarks/bench_scale.py --out $OUT --nproc 8 --budget-s 540     # 8 GPUs, NCCL
    python tools/benchmarks/bench_scale.py --out /tmp/s --smoke --nproc 4         # CPU, gloo

The driver (this file, plain ``python``) starts everything itself:

1. the N=1 reference: ``python pretrain_longvila.py`` (one process, first GPU) for a few
   iterations on a synthetic video data set written once by the driver;
2. one worker, ``torchrun --nproc-per-node N bench_scale.py --worker`` (this file), that runs,
   for every sequence-parallel layout of N ranks - MM-SP 2D (Ulysses x ring, zigzag), pure
   ring (``ring_varlen`` and ``zigzag_ring_varlen``), pure Ulysses -

   (e) the trainer's ``train()`` (``megatron_longvila.training.train``, what
       ``pretrain_longvila.py`` runs) for the same iterations on the same data, in-process,
       for the bf16 equivalence check against (1); one layout is run a second time with
       ``--seed`` + 1 (different initial weights) as a control that the check must flag;
   (a) the attention layer alone (``attention_2d``, the model's heads, one causal document of
       each global length), forward and forward+backward, TFLOP/s per GPU;
   (b) a training step of the real-shaped model (``--model``, default ``qwen2-1.5b`` + SigLIP)
       built by the trainer's builders, run by the trainer's forward step and Megatron's
       schedule, on a packed video row (``bench_step.video_batch``): tokens/s, model TFLOP/s
       per GPU (``training.flops.step_flops`` / N), peak memory (max over ranks);
   (c) a ladder of longer rows (one video sample each, full recompute) until the first
       failure: the largest sequence each layout trains.

Out-of-memory: a rank that fails writes ``fail.rank<r>.json`` and exits; torchrun ends the
others; the driver records the failed item and starts a new worker for what is left (a
failed length ends that layout's attention lengths / steps / ladder). Every item is bounded
by the budget: rank 0 decides run-or-skip from the time the previous item of the layout took,
and broadcasts the decision. NVLink multicast is off in this process and every child
(``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``).

Writes ``OUT/results.json`` (every row), ``OUT/tables.md`` (what is printed) and
``OUT/workers.log``. ``--smoke``: gloo on the CPU, the tiny model, tiny shapes, fp32.
"""

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NVLS_OFF)  # before torch / NCCL start; inherited by every child

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))

import torch  # noqa: E402

from bench_attention import causal_pairs, timeit  # noqa: E402
from bench_step import emit, free, is_oom, video_batch  # noqa: E402
from run_all import _short, md_table  # noqa: E402

from megatron_longvila import launch  # noqa: E402
from megatron_longvila.arguments import run_config_from_argv  # noqa: E402
from megatron_longvila.training.flops import step_flops  # noqa: E402
from megatron_longvila.training.step import BatchFeed, train_step  # noqa: E402
from megatron_longvila.training.train import (build_model, build_optimizer,  # noqa: E402
                                              init_parallel_state, train)

PAPER = ("LongVILA (arXiv 2408.10188) reports MM-SP 2.1-5.7x faster than ring-style sequence "
         "parallelism and 1.1-1.4x faster than Megatron-LM context parallelism.")


# ------------------------------------------------------------------ layouts

def plan_layouts(n, heads, kv_heads):
    """Every layout of ``n`` SP ranks: 2D (U x R, both > 1, zigzag), ring (both ring types),
    Ulysses. Invalid ones (heads not divisible, ...) keep their reason in ``invalid``."""
    from megatron_longvila.parallel.groups import validate_mmsp_sizes
    out = []
    for u in range(n - 1, 1, -1):
        if n % u == 0:
            out.append(dict(name=f"mmsp-2d U{u}xR{n // u}", family="2d", U=u, R=n // u,
                            ring_type="zigzag_ring_varlen"))
    out.append(dict(name=f"ring_varlen R{n}", family="ring", U=1, R=n, ring_type="ring_varlen"))
    out.append(dict(name=f"zigzag R{n}", family="zigzag", U=1, R=n,
                    ring_type="zigzag_ring_varlen"))
    out.append(dict(name=f"ulysses U{n}", family="ulysses", U=n, R=1,
                    ring_type="zigzag_ring_varlen"))
    for lay in out:
        try:
            validate_mmsp_sizes(n, 1, n, lay["R"], heads, kv_heads)
            lay["invalid"] = None
        except ValueError as e:
            lay["invalid"] = str(e)
    return out


def layout_flags(lay, n):
    return ["--context-parallel-size", str(n), "--seq-parallel-ring-size", str(lay["R"]),
            "--seq-parallel-ring-type", lay["ring_type"]]


# ------------------------------------------------------------------ worker (under torchrun)

class _Fail(Exception):
    pass


def _fake_oom(lay, kind, L):
    """Tests: ``BENCH_SCALE_FAKE_OOM=layout name|kind|tokens|rank`` raises an out-of-memory
    error on one rank only (the others go on into the collectives, as a real OOM would)."""
    spec = os.environ.get("BENCH_SCALE_FAKE_OOM")
    if not spec:
        return
    name, k, tokens, rank = spec.split("|")
    import torch.distributed as dist
    if name == lay["name"] and k == kind and L >= int(tokens) and dist.get_rank() == int(rank):
        raise torch.cuda.OutOfMemoryError(f"fake OOM at {L} tokens (BENCH_SCALE_FAKE_OOM)")


class Worker:
    def __init__(self, plan):
        import torch.distributed as dist
        self.plan = plan
        self.cuda = torch.cuda.is_available() and not plan["smoke"]
        if not self.cuda:
            torch.set_num_threads(1)
        self.backend = launch.init_process_group("nccl" if self.cuda else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else \
            torch.device("cpu")
        self.dtype = torch.bfloat16 if plan["bf16"] else torch.float32
        self.built = None  # (layout name, ddp, model, optimizer, scheduler, run config)
        self.last = {}     # (layout, kind) -> (tokens, seconds) of the last item run

    # -- helpers
    def _max(self, x):
        import torch.distributed as dist
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def _sync(self):
        import torch.distributed as dist
        if self.cuda:
            torch.cuda.synchronize()
        dist.barrier()

    def _bcast(self, obj):
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _emit(self, row):
        if self.rank == 0:
            emit(self.plan["rows"], row)

    def _run_config(self, lay, extra=()):
        """The trainer's RunConfig of its own flags for this layout."""
        p = self.plan
        argv = ["--model", p["model"], "--micro-batch-size", "1", "--global-batch-size", "1",
                "--train-iters", "1000", "--lr", "1e-5", "--min-lr", "1e-5", "--clip-grad", "1.0",
                "--weight-decay", "0.0", "--seq-length", str(p["max_len"]),
                "--max-position-embeddings", str(max(p["max_len"], 8192)),
                "--num-workers", "0", "--seed", "1234"] + layout_flags(lay, self.world)
        if p["bf16"]:
            argv.append("--bf16")
        if p["recompute"] == "full":
            argv += ["--recompute-granularity", "full"]
        if p["distributed_optimizer"]:
            argv.append("--use-distributed-optimizer")
        return run_config_from_argv(argv + ["--distributed-backend", self.backend] + list(extra),
                                    self.world)

    def _setup(self, lay, need_model):
        if self.built is not None and self.built[0] == lay["name"] and \
                (self.built[1] is not None or not need_model):
            return
        self.built = None
        free(self.device)
        cfg = self._run_config(lay)
        init_parallel_state(cfg)
        if not need_model:
            self.built = (lay["name"], None, None, None, None, cfg)
            return
        ddp, model = build_model(cfg)
        opt, sched = build_optimizer(cfg, ddp)
        self.built = (lay["name"], ddp, model, opt, sched, cfg)

    # -- items
    def run(self):
        for item in self.plan["items"]:
            lay = item["layout"]
            key = (lay["name"], item["kind"])
            est = None
            if key in self.last and item["kind"] != "equiv":
                L0, t0 = self.last[key]
                est = t0 * (item["tokens"] / L0) ** (2.0 if item["kind"] == "attention" else 1.5)
            go = True
            if self.rank == 0 and (time.time() > item["deadline"] or (
                    est is not None and time.time() + est > item["deadline"])):
                go = False
            go = self._bcast(go)
            base = dict(kind=item["kind"], layout=lay["name"], family=lay["family"],
                        U=lay["U"], R=lay["R"], tokens=item["tokens"], item=item["id"])
            if not go:
                why = f"needs ~{est:.0f} s" if est is not None else "the layout's share is spent"
                self._emit(dict(base, status=f"skipped: budget ({why})"))
                continue
            t = time.time()
            try:
                row = getattr(self, "do_" + item["kind"])(item, lay)
            except BaseException as e:  # noqa: BLE001 - OOM is a result: record it, then leave
                status = "OOM" if is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"
                with open(os.path.join(self.plan["out"], f"fail.rank{self.rank}.json"), "w") as f:
                    json.dump(dict(item=item["id"], status=status), f)
                print(f"[rank {self.rank}] item {item['id']} failed: {status}", flush=True)
                sys.stdout.flush()
                os._exit(3)
            # one-time set-up (groups, model build) does not scale with the length
            self.last[key] = (item["tokens"], time.time() - t - row.get("setup_s", 0.0))
            self._emit(dict(base, **dict(dict(wall_s=time.time() - t), **row)))
        self._sync()

    def do_equiv(self, item, lay):
        """The trainer's train() for the equivalence check (metrics file by rank 0)."""
        self.built = None
        free(self.device)
        cfg = run_config_from_argv(self.plan["equiv_argv"] + layout_flags(lay, self.world) +
                                   ["--metrics-file", item["metrics"], "--distributed-backend",
                                    self.backend] + item.get("extra", []), self.world)
        if self.rank == 0 and os.path.exists(item["metrics"]):
            os.remove(item["metrics"])
        _fake_oom(lay, "equiv", item["tokens"])
        t = time.time()
        train(cfg)
        self._sync()
        return dict(status="ok", metrics=item["metrics"], control=item.get("control", False),
                    wall_s=time.time() - t)

    def do_attention(self, item, lay):
        from megatron_longvila.kernels.attention import attention_2d
        from megatron_longvila.parallel.groups import get_mmsp_groups
        from megatron_longvila.parallel.layout import SequenceLayout
        t_setup = time.time()
        self._setup(lay, need_model=False)
        t_setup = time.time() - t_setup
        _fake_oom(lay, "attention", item["tokens"])
        p = self.plan
        h, g, d, S = p["heads"], p["kv_heads"], p["head_dim"], item["tokens"]
        groups = get_mmsp_groups()
        layout = SequenceLayout([0, S], lay["R"], lay["U"], lay["ring_type"])
        blocks = layout.attention_blocks(groups.ring_rank)
        n = layout.local_len
        gen = torch.Generator(device=self.device).manual_seed(self.rank)
        mk = lambda heads: torch.randn(n, heads, d, device=self.device, dtype=self.dtype,  # noqa
                                       generator=gen)
        q, k, v = (mk(x).requires_grad_() for x in (h, g, g))
        do = mk(h)
        scale = d ** -0.5

        def f():
            with torch.no_grad():
                attention_2d(q, k, v, blocks, scale, groups)

        def fb():
            out = attention_2d(q, k, v, blocks, scale, groups)
            torch.autograd.grad(out, (q, k, v), do)

        flops_f = 4.0 * d * h * causal_pairs([S])  # whole row, forward
        per_gpu = flops_f / self.world
        iters = p["attn_iters"] or max(1, min(20, int(2e14 / max(per_gpu, 1))))
        self._sync()
        tf = self._max(timeit(f, iters, self.device))
        self._sync()
        tfb = self._max(timeit(fb, iters, self.device))
        row = dict(status="ok", iters=iters, local_tokens=n, setup_s=t_setup, fwd_ms=tf * 1e3,
                   fwd_tflops_per_gpu=per_gpu / tf / 1e12, fwdbwd_ms=tfb * 1e3,
                   fwdbwd_tflops_per_gpu=3.5 * per_gpu / tfb / 1e12)
        return row

    def do_step(self, item, lay, ladder=False):
        t_setup = time.time()
        self._setup(lay, need_model=True)
        t_setup = time.time() - t_setup
        _, ddp, model, opt, sched, run = self.built
        p = self.plan
        cfg = run.arch
        L = item["tokens"]
        fps = 10 ** 9 if ladder else p["frames_per_sample"]
        b = video_batch(cfg, L, fps, p["text_per_sample"], device=self.device, dtype=self.dtype)
        batch = dict(b, num_samples=sum(1 for x in b["frames_per_sample"] if x > 0))
        _fake_oom(lay, "ladder" if ladder else "step", L)

        def step():  # the trainer's train_step on this one row
            feed = BatchFeed(iter([batch]), cfg, run.training.trainable)
            return train_step(ddp, opt, sched, feed, num_micro_batches=1, seq_length=L,
                              global_batch_size=1, dtype=run.model.dtype)

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        steps = p["ladder_steps"] if ladder else p["steps"]
        for _ in range(p["warmup"]):
            step()
        times = []
        for _ in range(steps):
            self._sync()
            t = time.perf_counter()
            out = step()
            self._sync()
            times.append(time.perf_counter() - t)
        dt = self._max(statistics.median(times))
        fl = step_flops(cfg, b["seg_lens"], b["n_frames"], labelled_tokens=b["n_valid"])
        row = dict(status="ok", steps=len(times), setup_s=t_setup, frames=b["n_frames"],
                   samples=sum(1 for x in b["frames_per_sample"] if x > 0), step_s=dt,
                   tokens_per_s=L / dt, tokens_per_s_per_gpu=L / dt / self.world,
                   model_tflop_per_step=fl["total"] / 1e12,
                   tflops_per_gpu=fl["total"] / dt / self.world / 1e12,
                   loss=out.loss, recompute=p["recompute"])
        if self.cuda:
            row["peak_mem_gib"] = self._max(torch.cuda.max_memory_allocated() / 2 ** 30)
        if not math.isfinite(row["loss"]):
            row["status"] = "non-finite loss"
        batch = b = None  # free the row before the next item
        free(self.device)
        return row

    def do_ladder(self, item, lay):
        return self.do_step(item, lay, ladder=True)


def worker_main(plan_path):
    with open(plan_path) as f:
        plan = json.load(f)
    w = Worker(plan)
    w.run()
    launch.shutdown()


# ------------------------------------------------------------------ driver

class Driver:
    def __init__(self, args):
        self.a = args
        self.t0 = time.time()
        self.t_end = self.t0 + args.budget_s
        os.makedirs(args.out, exist_ok=True)
        self.rows_path = os.path.join(args.out, "rows.jsonl")
        if os.path.exists(self.rows_path):
            os.remove(self.rows_path)
        self.log = open(os.path.join(args.out, "workers.log"), "w")
        self.notes = []
        from megatron_longvila.models import get_preset
        self.cfg = get_preset(args.model)
        llm = self.cfg.llm
        self.heads, self.kv_heads, self.head_dim = (llm.num_attention_heads,
                                                    llm.num_query_groups, llm.kv_channels)
        self.layouts = plan_layouts(args.nproc, self.heads, self.kv_heads)

    def remaining(self):
        return self.t_end - time.time()

    def spawn(self, name, cmd, timeout, env=None):
        """Run ``cmd`` in its own process group; kill the group past ``timeout``."""
        print(f"== {name} (up to {timeout:.0f} s): {' '.join(cmd)}", flush=True)
        self.log.write(f"\n== {name}: {' '.join(cmd)}\n")
        self.log.flush()
        e = dict(os.environ, PYTHONUNBUFFERED="1", **NVLS_OFF)
        e.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        e["PYTHONPATH"] = os.pathsep.join(x for x in (ROOT, e.get("PYTHONPATH", "")) if x)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            e.pop(k, None)
        if self.a.smoke:
            e.setdefault("OMP_NUM_THREADS", "1")
        e.update(env or {})
        t = time.time()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=self.log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = "killed (time limit)"
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind
        except ProcessLookupError:
            pass
        proc.wait()
        self.log.flush()
        print(f"== {name}: exit {rc} after {time.time() - t:.0f} s "
              f"({self.remaining():.0f} s of budget left)", flush=True)
        return rc

    def rows(self):
        if not os.path.exists(self.rows_path):
            return []
        with open(self.rows_path) as f:
            return [json.loads(x) for x in f if x.strip()]

    # -- the equivalence set-up
    def equiv_argv(self, data):
        a = self.a
        argv = ["--model", a.model, "--data-path", data, "--tokenizer-model", "tiny",
                "--seq-length", str(a.equiv_seq_length), "--micro-batch-size", "1",
                "--global-batch-size", "1", "--train-iters", str(a.equiv_iters),
                "--lr", str(a.equiv_lr), "--lr-warmup-iters", "0", "--seed", "11",
                "--no-shuffle", "--num-workers", "0", "--log-interval", "1",
                "--max-position-embeddings", str(max(a.equiv_seq_length, 8192))]
        if not a.smoke:
            argv += ["--bf16", "--recompute-granularity", "full"]
        return argv

    def make_data(self):
        from megatron_longvila.data import make_synthetic_dataset
        a = self.a
        d = os.path.join(a.out, "equiv_data")
        t = time.time()
        path = make_synthetic_dataset(d, num_videos=a.equiv_videos, num_frames=a.equiv_frames,
                                      frames_per_video=max(12, a.equiv_frames),
                                      image_size=self.cfg.vision.image_size, seed=3,
                                      shard_max_samples=4)
        print(f"== equivalence data: {a.equiv_videos} synthetic videos of {a.equiv_frames} "
              f"frames in {path} ({time.time() - t:.0f} s)", flush=True)
        return path

    def run(self):
        a = self.a
        valid = [lay for lay in self.layouts if not lay["invalid"]]
        for lay in self.layouts:
            if lay["invalid"]:
                emit(self.rows_path, dict(kind="layout", layout=lay["name"], family=lay["family"],
                                          U=lay["U"], R=lay["R"],
                                          status=f"n/a: {lay['invalid']}"))
        items = []
        eq_dir = os.path.join(a.out, "equiv")
        os.makedirs(eq_dir, exist_ok=True)
        self.ref_metrics = os.path.join(eq_dir, "n1.jsonl")
        argv = None
        if a.equiv_iters > 0 and valid:
            data = self.make_data()
            argv = self.equiv_argv(data)
            if os.path.exists(self.ref_metrics):
                os.remove(self.ref_metrics)
            env = {"CUDA_VISIBLE_DEVICES": "0"} if not a.smoke else {}
            rc = self.spawn("(e) N=1 reference: pretrain_longvila.py",
                            [sys.executable, os.path.join(ROOT, "pretrain_longvila.py")] + argv +
                            ["--metrics-file", self.ref_metrics],
                            min(a.equiv_ref_max_s, self.remaining() - 30), env)
            if rc != 0:
                self.notes.append(f"(e) N=1 reference: exit {rc} (see workers.log)")
            control = next((x for x in valid if x["name"] == a.control_layout), valid[0])
            for lay in valid:
                items.append(dict(kind="equiv", layout=lay, tokens=a.equiv_seq_length,
                                  metrics=os.path.join(eq_dir, f"{lay['name'].replace(' ', '_')}"
                                                               ".jsonl")))
            items.append(dict(kind="equiv", layout=control, tokens=a.equiv_seq_length,
                              control=True, extra=["--seed", "12"],
                              metrics=os.path.join(eq_dir, "control_seed12.jsonl")))
        for lay in valid:
            items += [dict(kind="attention", layout=lay, tokens=L) for L in a.attn_lengths]
            items += [dict(kind="step", layout=lay, tokens=L) for L in a.step_lengths]
            items += [dict(kind="ladder", layout=lay, tokens=L) for L in a.ladder]
        for i, it in enumerate(items):
            it["id"] = i
        self.items = items
        bench_start = len([x for x in items if x["kind"] == "equiv"])
        todo = list(items)
        launches = 0
        while todo and self.remaining() > a.min_launch_s:
            self._deadlines(todo, bench_start)
            for fn in os.listdir(a.out):
                if fn.startswith("fail.rank"):
                    os.remove(os.path.join(a.out, fn))
            plan = dict(items=todo, rows=self.rows_path, out=a.out, smoke=a.smoke,
                        bf16=not a.smoke, model=a.model, heads=self.heads,
                        kv_heads=self.kv_heads, head_dim=self.head_dim,
                        max_len=max([x["tokens"] for x in todo if x["kind"] != "equiv"] + [256]),
                        recompute=a.recompute, distributed_optimizer=not a.smoke and
                        not a.no_distributed_optimizer, steps=a.steps, warmup=a.warmup,
                        ladder_steps=a.ladder_steps, frames_per_sample=a.frames_per_sample,
                        text_per_sample=a.text_per_sample, attn_iters=a.attn_iters,
                        equiv_argv=argv)
            plan_path = os.path.join(a.out, f"plan{launches}.json")
            with open(plan_path, "w") as f:
                json.dump(plan, f)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", str(a.nproc), os.path.abspath(__file__), "--worker",
                   plan_path]
            before = len(self.rows())
            rc = self.spawn(f"worker {launches} ({len(todo)} items)", cmd, self.remaining() - 5)
            launches += 1
            progress = len(self.rows()) > before
            done = {r.get("item") for r in self.rows()}
            left = [x for x in todo if x["id"] not in done]
            if not left:
                break
            failed = left[0]
            status = None
            for fn in sorted(os.listdir(a.out)):
                if fn.startswith("fail.rank"):
                    with open(os.path.join(a.out, fn)) as f:
                        st = json.load(f)
                    if st["item"] == failed["id"] and (status is None or st["status"] == "OOM"):
                        status = st["status"]
                        progress = True
            status = status or f"worker exit {rc} (see workers.log)"
            lay = failed["layout"]
            emit(self.rows_path, dict(kind=failed["kind"], layout=lay["name"],
                                      family=lay["family"], U=lay["U"], R=lay["R"],
                                      tokens=failed["tokens"], item=failed["id"], status=status,
                                      control=failed.get("control", False)))
            if not progress:  # the worker died before any item: do not start it again
                self.notes.append(f"worker {launches - 1}: exit {rc} before its first item "
                                  "reported (see workers.log); not restarted")
                break
            # a failed length ends that layout's lengths of the same kind
            todo = [x for x in left[1:] if not (
                x["kind"] == failed["kind"] and x["kind"] != "equiv" and
                x["layout"]["name"] == lay["name"] and x["tokens"] >= failed["tokens"])]
        done = {r.get("item") for r in self.rows()}
        for x in items:
            if x["id"] not in done:
                emit(self.rows_path, dict(kind=x["kind"], layout=x["layout"]["name"],
                                          family=x["layout"]["family"], U=x["layout"]["U"],
                                          R=x["layout"]["R"], tokens=x["tokens"], item=x["id"],
                                          status="not run: budget or earlier failure",
                                          control=x.get("control", False)))
        return self.report()

    def _deadlines(self, todo, bench_start):
        """Equivalence items: run all (they are short). Bench items: the bench budget split
        evenly over the layouts still to go, in order."""
        names = []
        for x in todo:
            if x["kind"] != "equiv" and x["layout"]["name"] not in names:
                names.append(x["layout"]["name"])
        end = self.t_end - 10
        n_eq = sum(1 for x in todo if x["kind"] == "equiv")
        # equivalence first; leave it a share of what is left
        eq_share = min(0.35, 0.07 * n_eq) if n_eq else 0.0
        start = time.time() + eq_share * max(0.0, end - time.time())
        span = max(0.0, end - start)
        for x in todo:
            if x["kind"] == "equiv":
                x["deadline"] = end
            else:
                i = names.index(x["layout"]["name"])
                x["deadline"] = start + span * (i + 1) / len(names)

    # ------------------------------------------------------------------ tables
    def equivalence(self):
        a = self.a
        ref = read_train_records(self.ref_metrics)
        out = []
        for r in self.rows():
            if r["kind"] != "equiv":
                continue
            row = dict(layout=r["layout"] + (" (control: --seed 12)" if r.get("control") else ""),
                       control=bool(r.get("control")), status=r["status"])
            if r["status"] == "ok":
                got = read_train_records(r["metrics"])
                row.update(compare_losses(got, ref, a.equiv_iters, a.loss_rtol,
                                          a.grad_norm_rtol))
                if row["control"]:
                    row["verdict"] = ("flagged (as it must be)" if row["verdict"] == "DIFFERS"
                                      else "NOT flagged: the check is too loose")
            else:
                row["verdict"] = "not run" if r["status"].startswith("not run") else "FAILED"
            out.append(row)
        return ref, out

    def report(self):
        a = self.a
        rows = self.rows()
        n = a.nproc
        dev = "CPU (gloo)" if a.smoke else (torch.cuda.get_device_name()
                                           if torch.cuda.is_available() else "?")
        out = [f"# MM-SP on {n} {'gloo processes' if a.smoke else 'GPUs'} "
               f"({'SMOKE, CPU, tiny shapes, fp32' if a.smoke else 'NCCL, bf16'})", "",
               f"device: {dev}, torch {torch.__version__}, model {a.model} (heads {self.heads}, "
               f"KV heads {self.kv_heads}, head dim {self.head_dim}), "
               f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC",
               f"budget: {a.budget_s:.0f} s, used {time.time() - self.t0:.0f} s; NVLink multicast "
               f"off ({', '.join(f'{k}={v}' for k, v in NVLS_OFF.items())})", ""]
        out += ["## layouts", "", md_table([dict(name=x["name"], U=x["U"], R=x["R"],
                                                 ring_type=x["ring_type"] if x["R"] > 1 else "-",
                                                 valid=x["invalid"] or "yes")
                                            for x in self.layouts],
                                           ["name", "U", "R", "ring_type", "valid"],
                                           ["layout", "Ulysses", "ring", "ring type",
                                            "valid for the model"]), ""]
        # (e)
        ref, eq = self.equivalence()
        out += [f"## (e) equivalence: the trainer's first {a.equiv_iters} iterations at each "
                f"layout against N=1 ({'fp32' if a.smoke else 'bf16'}, "
                f"{a.equiv_seq_length} tokens)", ""]
        if not ref:
            out.append("N=1 reference: no metrics (see workers.log)")
        out += [md_table(eq, ["layout", "max_loss_rel", "max_grad_norm_rel", "losses", "verdict"],
                         ["layout", "max rel. loss diff", "max rel. grad-norm diff",
                          "losses (N=1 -> layout)", "verdict"]), "",
                f"tolerance: loss {a.loss_rtol:g}, grad norm {a.grad_norm_rtol:g} (relative). "
                "The control is a layout run again with another --seed (other initial "
                "weights): the check must flag it.", ""]
        # (a)
        att = [r for r in rows if r["kind"] == "attention"]
        out += ["## (a) attention layer alone (attention_2d, one causal document), "
                "TFLOP/s per GPU", ""]
        tab = []
        for r in att:
            ok = r["status"] == "ok"
            tab.append(dict(layout=r["layout"], tokens=r["tokens"],
                            local=r.get("local_tokens", ""),
                            f=f"{r['fwd_ms']:.2f}" if ok else "",
                            ftf=f"{r['fwd_tflops_per_gpu']:.4g}" if ok else "",
                            fb=f"{r['fwdbwd_ms']:.2f}" if ok else "",
                            fbtf=f"{r['fwdbwd_tflops_per_gpu']:.4g}" if ok else "",
                            status=_short(r["status"])))
        out += [md_table(tab, ["layout", "tokens", "local", "f", "ftf", "fb", "fbtf", "status"],
                         ["layout", "global tokens", "tokens per GPU", "fwd ms",
                          "fwd TFLOP/s/GPU", "fwd+bwd ms", "fwd+bwd TFLOP/s/GPU", "status"]), "",
                "FLOPs: 4*d*heads per attended causal pair forward, 2.5x that backward "
                "(bench_attention.py), whole row divided by the number of GPUs; time = the "
                "slowest rank.", ""]
        # (b) + (c)
        def fmt(r):
            ok = r["status"] == "ok"
            return dict(layout=r["layout"], tokens=r["tokens"],
                        frames=f"{r['frames']} in {r['samples']}" if "frames" in r else "",
                        step_s=f"{r['step_s']:.3f}" if ok else "",
                        tok=f"{r['tokens_per_s']:.0f}" if ok else "",
                        tokg=f"{r['tokens_per_s_per_gpu']:.0f}" if ok else "",
                        tf=f"{r['tflops_per_gpu']:.4g}" if ok else "",
                        mem=f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "",
                        loss=f"{r['loss']:.3f}" if ok else "", status=_short(r["status"]))
        cols = ["layout", "tokens", "frames", "step_s", "tok", "tokg", "tf", "mem", "loss",
                "status"]
        heads = ["layout", "tokens", "frames in samples", "step s (median, slowest rank)",
                 "tokens/s", "tokens/s per GPU", "model TFLOP/s per GPU", "peak GiB (max rank)",
                 "loss", "status"]
        steps = [r for r in rows if r["kind"] == "step"]
        lad = [r for r in rows if r["kind"] == "ladder"]
        out += [f"## (b) training step, {a.model}, packed video row, recompute {a.recompute}", "",
                md_table([fmt(r) for r in steps], cols, heads), ""]
        out += self.paper_table(steps)
        out += ["## (c) longest sequence each layout trains (one video sample per row, full "
                "recompute)", "", md_table([fmt(r) for r in lad], cols, heads), ""]
        for lay in self.layouts:
            if lay["invalid"]:
                out.append(f"- {lay['name']}: n/a ({_short(lay['invalid'], 100)})")
                continue
            mine = [r for r in lad if r["layout"] == lay["name"]]
            ok = [r["tokens"] for r in mine if r["status"] == "ok"]
            bad = [r for r in mine if r["status"] != "ok"]
            nxt = (f"; next rung {bad[0]['tokens']}: {_short(bad[0]['status'])}" if bad else
                   "; every rung tried fit (the ladder's top)")
            out.append(f"- {lay['name']}: longest that trains: **{max(ok) if ok else 'none'}** "
                       f"tokens{nxt}")
        out.append("")
        if self.notes:
            out += ["## notes", ""] + [f"- {x}" for x in self.notes] + [""]
        text = "\n".join(out)
        print("\n" + text, flush=True)
        with open(os.path.join(a.out, "tables.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(dict(args=vars(a), layouts=self.layouts, rows=rows, equivalence=eq,
                           notes=self.notes), f, indent=1)
        os.remove(self.rows_path)
        self.log.close()
        return dict(rows=rows, text=text, equivalence=eq, layouts=self.layouts)

    def paper_table(self, steps):
        """MM-SP over the ring layouts at each length, beside LongVILA's published ratios."""
        ok = [r for r in steps if r["status"] == "ok"]
        res = []
        for L in sorted({r["tokens"] for r in ok}):
            at = {r["layout"]: r for r in ok if r["tokens"] == L}
            fam = lambda f: [r for r in at.values() if r["family"] == f]  # noqa: E731
            mmsp = sorted(fam("2d"), key=lambda r: -r["tokens_per_s"])
            label = "best 2D"
            if not mmsp:
                mmsp, label = fam("ulysses"), "Ulysses only (no 2D layout at this N)"
            ring, zig = fam("ring"), fam("zigzag")
            row = dict(tokens=L, mmsp=f"{mmsp[0]['tokens_per_s']:.0f} ({mmsp[0]['layout']}, "
                                      f"{label})" if mmsp else "-")
            row["ring"] = (f"**{mmsp[0]['tokens_per_s'] / ring[0]['tokens_per_s']:.2f}x**"
                           if mmsp and ring else "-")
            row["zig"] = (f"**{mmsp[0]['tokens_per_s'] / zig[0]['tokens_per_s']:.2f}x**"
                          if mmsp and zig else "-")
            res.append(row)
        return ["tokens/s of MM-SP over the ring layouts, beside LongVILA's figures. " + PAPER +
                " Megatron-LM's own context parallelism (Transformer Engine) is not installed on "
                "these machines: the last column uses our zigzag ring (the same load-balanced "
                "ring scheme) as a stand-in, not Megatron-LM's code.", "",
                md_table(res, ["tokens", "mmsp", "ring", "zig"],
                         ["tokens", "MM-SP tokens/s (layout)",
                          "MM-SP / ring_varlen (paper: 2.1-5.7x vs ring-style SP)",
                          "MM-SP / our zigzag ring (stand-in; paper: 1.1-1.4x vs Megatron-LM CP)"]),
                ""]


def read_train_records(path):
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in (json.loads(x) for x in f if x.strip()) if "loss" in r]


def compare_losses(got, ref, iters, loss_rtol, gn_rtol):
    """Relative differences of loss and grad norm over the first ``iters`` iterations."""
    if len(ref) < iters or len(got) < iters:
        return dict(max_loss_rel="", max_grad_norm_rel="", losses="",
                    verdict=f"INCOMPLETE ({len(got)} / {len(ref)} of {iters} iterations)")
    rel = lambda x, y: abs(x - y) / max(abs(y), 1e-12)  # noqa: E731
    lr = max(rel(g["loss"], r["loss"]) for g, r in zip(got[:iters], ref[:iters]))
    gr = max(rel(g["grad_norm"], r["grad_norm"]) for g, r in zip(got[:iters], ref[:iters])
             if g.get("grad_norm") is not None and r.get("grad_norm") is not None)
    ok = lr <= loss_rtol and gr <= gn_rtol and all(math.isfinite(g["loss"]) for g in got[:iters])
    return dict(max_loss_rel=f"{lr:.2e}", max_grad_norm_rel=f"{gr:.2e}",
                losses=" ".join(f"{r['loss']:.4f}->{g['loss']:.4f}"
                                for g, r in zip(got[:iters], ref[:iters])),
                loss_rel=lr, grad_norm_rel=gr, verdict="MATCHES" if ok else "DIFFERS")


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output directory (required)")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks (default: the visible GPUs; --smoke: 4)")
    p.add_argument("--budget-s", type=float, default=540.0)
    p.add_argument("--model", default="qwen2-1.5b")
    p.add_argument("--attn-lengths", default="32768,131072,524288",
                   help="global tokens of the attention rows")
    p.add_argument("--attn-iters", type=int, default=0, help="0: by FLOPs, as bench_attention")
    p.add_argument("--step-lengths", default="32768,65536", help="global tokens per step")
    p.add_argument("--ladder", default=None,
                   help="ladder lengths (default: N x 64k, 128k, 192k, 256k; one GPU trained "
                        "64k, and every rank makes the whole row's frames in host memory)")
    p.add_argument("--recompute", choices=("full", "none"), default="full")
    p.add_argument("--no-distributed-optimizer", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ladder-steps", type=int, default=1)
    p.add_argument("--frames-per-sample", type=int, default=64)
    p.add_argument("--text-per-sample", type=int, default=256)
    p.add_argument("--equiv-iters", type=int, default=3, help="0: no equivalence check")
    p.add_argument("--equiv-seq-length", type=int, default=8192)
    p.add_argument("--equiv-frames", type=int, default=16)
    p.add_argument("--equiv-videos", type=int, default=6)
    p.add_argument("--equiv-lr", type=float, default=1e-5)
    p.add_argument("--equiv-ref-max-s", type=float, default=150.0)
    p.add_argument("--loss-rtol", type=float, default=None,
                   help="default 1e-2 in bf16, 1e-4 in the fp32 smoke")
    p.add_argument("--grad-norm-rtol", type=float, default=None,
                   help="default 5e-2 in bf16, 1e-3 in the fp32 smoke")
    p.add_argument("--control-layout", default="",
                   help="layout run again with another seed (default: the first valid one)")
    p.add_argument("--min-launch-s", type=float, default=40.0)
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny model and shapes")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return a
    if not a.out:
        p.error("--out is required")
    if a.smoke:
        a.model = "tiny" if a.model == "qwen2-1.5b" else a.model
        a.nproc = a.nproc or 4
        a.attn_lengths = "256" if a.attn_lengths == "32768,131072,524288" else a.attn_lengths
        a.step_lengths = "256" if a.step_lengths == "32768,65536" else a.step_lengths
        a.ladder = a.ladder or "256,384"
        a.attn_iters = a.attn_iters or 2
        a.steps, a.warmup = 1, 1
        a.frames_per_sample, a.text_per_sample = 4, 24
        a.equiv_seq_length, a.equiv_frames, a.equiv_videos, a.equiv_lr = 256, 4, 8, 2e-3
        a.min_launch_s = min(a.min_launch_s, 10.0)
    if a.nproc is None:
        a.nproc = torch.cuda.device_count()
        if a.nproc < 2:
            raise SystemExit("bench_scale.py: fewer than 2 GPUs visible (use --smoke on the CPU)")
    a.attn_lengths, a.step_lengths = _ints(a.attn_lengths), _ints(a.step_lengths)
    a.ladder = _ints(a.ladder) if a.ladder else [a.nproc * k * 1024 for k in
                                                 (64, 128, 192, 256)]
    a.loss_rtol = a.loss_rtol if a.loss_rtol is not None else (1e-4 if a.smoke else 1e-2)
    a.grad_norm_rtol = a.grad_norm_rtol if a.grad_norm_rtol is not None else \
        (1e-3 if a.smoke else 5e-2)
    return a


def main(argv=None):
    a = parse(argv)
    if a.worker:
        return worker_main(a.worker)
    return Driver(a).run()


if __name__ == "__main__":
    main()
