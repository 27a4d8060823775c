#!/usr/bin/env python
"""Issue 8 in one call: build, check and time on one GPU, print the tables.

    python tools/benchmarks/run_all.py --out $OUT --budget-s 480
    python tools/benchmarks/run_all.py --out /tmp/b --smoke       # CPU, tiny shapes

Phases, each in its own subprocess (a crash or a stuck kernel loses only that phase), in
this order, each with a deadline carved out of ``--budget-s``:

0. (in phase 2's worker) environment, the tiny model forward+backward in bf16 on the GPU
   (sanity), and the bf16 matmul rate (8192^3, median of 7 x 20) = the MFU denominator;
1. (a) ``bench_attention.py --check`` (our CUDA attention kernels against float64), then the
   core attention at SP=1, causal, 8k/32k/128k tokens, one document and a packed row of
   6 uneven documents: ``bench_attention.py`` (our SP=1 path vs torch SDPA cuDNN / flash);
2. (b) ours: ``qwen2-1.5b`` + SigLIP-so400m training step at 8k and 32k tokens (cheapest
   recompute mode that fits), then (d) the full-recompute ladder up to 256k (one video
   sample per row), stopping at the first failure;
3. (c) the Hugging Face reference with SDPA per document, same steps, then its ladder;
4. (c') the Hugging Face reference with transformers' own packed-row SDPA (block mask), steps.

Writes ``OUT/results.json`` (every row), ``OUT/tables.md`` (what is printed),
``OUT/workers.log`` (the workers' full output) and ``OUT/attention/`` (bench_attention's files).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))


def md_table(rows, cols, heads=None):
    heads = heads or cols
    out = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(out)


ATT_COLS = ["tokens", "docs", "method", "fwd_ms", "fwd_tflops", "fwdbwd_ms", "fwdbwd_tflops"]


def parse_attention_lines(lines):
    """Rows of bench_attention.py's progress lines (``tokens docs method fwd_ms fwd_tflops
    fwdbwd_ms fwdbwd_tflops``, space aligned; a failed backend ends in ``n/a: Error``)."""
    rows = []
    for line in lines:
        t = line.split()
        if len(t) < 7 or not t[0].isdigit() or t[1] not in ("1doc", "6docs"):
            continue
        if t[-2].endswith(":"):  # "n/a: OutOfMemoryError"
            t = t[:-2] + [t[-2] + " " + t[-1]]
        row = dict(zip(ATT_COLS, [t[0], t[1], " ".join(t[2:-4])] + t[-4:]))
        if not any(r["tokens"] == row["tokens"] and r["docs"] == row["docs"] and
                   r["method"] == row["method"] for r in rows):  # its final table repeats them
            rows.append(row)
    return rows


def write_attention_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ATT_COLS)
        w.writeheader()
        w.writerows(rows)


def _short(s, n=140):
    s = str(s).strip().splitlines()[0] if str(s).strip() else ""
    return (s[:n] + "...") if len(s) > n else s


class Driver:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.t_end = self.t0 + args.budget_s
        os.makedirs(args.out, exist_ok=True)
        self.rows_path = os.path.join(args.out, "rows.jsonl")
        if os.path.exists(self.rows_path):
            os.remove(self.rows_path)
        self.log = open(os.path.join(args.out, "workers.log"), "w")
        self.skipped = []

    def remaining(self):
        return self.t_end - time.time()

    def spawn(self, name, cmd, deadline):
        """Run ``cmd``; kill it (only it) past ``deadline`` + grace. Returns its exit code."""
        timeout = min(deadline + self.args.grace_s, self.t_end) - time.time()
        if timeout < self.args.min_phase_s:
            self.skipped.append(f"{name}: skipped, {max(timeout, 0):.0f} s of budget left")
            print(f"== {name}: skipped (budget)", flush=True)
            return None
        print(f"== {name} (up to {timeout:.0f} s): {' '.join(cmd)}", flush=True)
        self.log.write(f"\n== {name}: {' '.join(cmd)}\n")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.last_lines = lines = []

        def pump():
            for line in proc.stdout:
                self.log.write(line)
                lines.append(line.rstrip())
                low = line.lower()
                if line.startswith("{") or not ("warn" in low or low.startswith("  ")):
                    print("   " + line.rstrip()[:400], flush=True)
        th = threading.Thread(target=pump, daemon=True)
        th.start()
        t = time.time()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "killed"
            self.skipped.append(f"{name}: stopped at its time limit ({timeout:.0f} s); "
                                f"configurations it had not reported were not run")
        th.join(timeout=5)
        self.log.flush()
        print(f"== {name}: exit {rc} after {time.time() - t:.0f} s "
              f"({self.remaining():.0f} s of budget left)", flush=True)
        if rc not in (0, "killed"):
            self.skipped.append(f"{name}: exit code {rc} (see workers.log)")
        return rc

    def step_cmd(self, impl, lengths, ladder, deadline, extra=()):
        a = self.args
        cmd = [sys.executable, os.path.join(HERE, "bench_step.py"), "--impl", impl,
               "--lengths", lengths, "--ladder-lengths", ladder, "--out", self.rows_path,
               "--deadline", f"{deadline:.0f}", "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--ladder-steps", str(a.ladder_steps),
               "--frames-per-sample", str(a.frames_per_sample),
               "--text-per-sample", str(a.text_per_sample)] + list(extra)
        if a.smoke:
            cmd += ["--smoke", "--device", "cpu"]
        return cmd

    def run(self):
        a = self.args
        # 1. attention (a)
        att_dir = os.path.join(a.out, "attention")
        cmd = [sys.executable, os.path.join(HERE, "bench_attention.py"), "--out", att_dir,
               "--seqlens", a.attn_seqlens]
        if a.smoke:
            cmd += ["--heads", "4", "--kv-heads", "2", "--head-dim", "16"]
        self.check = None
        if "attention" in a.phases:
            if not a.smoke:  # kernel exactness against float64 (GPU only), small shapes
                rc = self.spawn("(a) attention check", [
                    sys.executable, os.path.join(HERE, "bench_attention.py"), "--out", att_dir,
                    "--check"], time.time() + 60)
                self.check = (rc, [x for x in self.last_lines if "rel err" in x or
                                   "Error" in x][-8:])
            self.spawn("(a) attention", cmd, time.time() + min(a.attn_max_s,
                                                               0.3 * self.remaining()))
            csv_path = os.path.join(att_dir, "attention.csv")
            if not os.path.exists(csv_path):  # stopped early: keep the rows it printed
                rows = parse_attention_lines(self.last_lines)
                if rows:
                    write_attention_csv(csv_path, rows)
                    self.skipped.append(f"(a) attention: stopped early, {len(rows)} rows kept "
                                        "from its output")
        # 2. ours: sanity + peak + (b) + (d)
        if "ours" in a.phases:
            d = time.time() + 0.45 * self.remaining()
            self.spawn("(b,d) ours", self.step_cmd("ours", a.lengths, a.ladder, d, ["--sanity"]),
                       d)
        # 3. HF reference, SDPA per document: (c) + (d)
        if "hf" in a.phases:
            d = time.time() + (0.7 if "hf_packed" in a.phases else 1.0) * self.remaining()
            self.spawn("(c,d) hf sdpa per document",
                       self.step_cmd("hf", a.lengths, a.ladder, d, ["--hf-attn", "docs"]), d)
        # 4. HF reference, transformers' packed-row SDPA (block mask): (c')
        if "hf_packed" in a.phases:
            d = self.t_end - 5
            self.spawn("(c') hf sdpa packed mask",
                       self.step_cmd("hf", a.lengths, "", d, ["--hf-attn", "sdpa"]), d)
        return self.report()

    # ------------------------------------------------------------------ tables
    def report(self):
        a = self.args
        rows = []
        if os.path.exists(self.rows_path):
            with open(self.rows_path) as f:
                rows = [json.loads(x) for x in f if x.strip()]
        env = next((r for r in rows if r["kind"] == "env"), {})
        sanity = next((r for r in rows if r["kind"] == "sanity"), None)
        peak = next((r for r in rows if r["kind"] == "peak" and "tflops" in r), None)
        peak_tf = peak["tflops"] if peak else None
        steps = [r for r in rows if r["kind"] == "step"]
        for r in steps:
            if peak_tf and r.get("status") == "ok":
                r["mfu"] = r["tflops"] / peak_tf
        out = [f"# LongVILA benchmarks ({'SMOKE, CPU, tiny shapes' if a.smoke else 'GPU'})", ""]
        out.append("device: " + ", ".join(f"{k}={env[k]}" for k in
                                          ("device", "gpu_mem_gib", "torch", "cuda", "cudnn",
                                           "megatron_core", "transformers", "python",
                                           "date_utc") if k in env))
        out.append(f"budget: {a.budget_s:.0f} s, used {time.time() - self.t0:.0f} s")
        out.append("")
        out.append("## 0. sanity and peak")
        if sanity and "loss" not in sanity:
            out.append(f"sanity: **{sanity['status']}**")
        elif sanity:
            out.append(f"tiny model fwd+bwd in bf16 on {env.get('device', '?')}: "
                       f"loss {sanity['loss']:.4f}, {sanity['n_grads']} grads finite: "
                       f"{sanity['grads_finite']} -> **{sanity['status']}**")
        else:
            out.append("sanity: not run")
        out.append(f"bf16 matmul {peak['n']}^3, median of {len(peak['tflops_all'])}: "
                   f"**{peak_tf:.1f} TFLOP/s** (the MFU denominator)" if peak else
                   "matmul peak: not measured (no MFU)")
        out.append("")
        if getattr(self, "check", None):
            rc, lines = self.check
            out += ["## (a) attention kernels against float64 (bench_attention.py --check)", "",
                    f"exit {rc} ({'passed' if rc == 0 else 'FAILED or not finished'})", ""]
            out += [f"    {x}" for x in lines] + [""]
        out += self.attention_table(os.path.join(a.out, "attention", "attention.csv"))
        out += self.step_tables(steps)
        if self.skipped:
            out += ["## not run / cut short", ""] + [f"- {s}" for s in self.skipped] + [""]
        text = "\n".join(out)
        print("\n" + text, flush=True)
        with open(os.path.join(a.out, "tables.md"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(dict(args={k: v for k, v in vars(a).items()}, rows=rows,
                           skipped=self.skipped), f, indent=1)
        os.remove(self.rows_path) if os.path.exists(self.rows_path) else None
        self.log.close()
        return dict(rows=rows, text=text, skipped=self.skipped)

    @staticmethod
    def attention_table(path):
        out = ["## (a) core attention at SP=1, causal, bf16, fwd+bwd TFLOP/s", ""]
        if not os.path.exists(path):
            return out + ["not run (see 'not run' below)", ""]
        with open(path) as f:
            rows = list(csv.DictReader(f))
        by = {}
        for r in rows:
            by.setdefault((int(r["tokens"]), r["docs"]), {})[r["method"]] = r

        def num(x):
            try:
                return float(x)
            except (TypeError, ValueError):
                return None
        methods = []
        for r in rows:
            if r["method"] not in methods:
                methods.append(r["method"])
        main = next((k for k in methods if k.startswith("ours")), None)
        table = []
        for (S, docs), m in sorted(by.items()):
            row = dict(tokens=S, docs=docs)
            for key, col in (("fwdbwd_tflops", "fb"), ("fwd_tflops", "f")):
                best, best_name = None, "-"
                for k, v in m.items():
                    row[f"{k}_{col}"] = v[key]
                    x = num(v[key])
                    if not k.startswith("ours") and x is not None and (best is None or x > best):
                        best, best_name = x, k
                o = num(m[main][key]) if main in m else None
                row[f"ratio_{col}"] = (f"{o / best:.2f} ({best_name.replace('sdpa ', '')})"
                                       if o is not None and best else "-")
            table.append(row)
        cols = ["tokens", "docs"] + [f"{k}_fb" for k in methods] + ["ratio_fb"] + \
            [f"{k}_f" for k in methods] + ["ratio_f"]
        heads = ["tokens", "docs"] + [f"{k} fwd+bwd" for k in methods] + \
            [f"{main} / best SDPA, fwd+bwd"] + [f"{k} fwd" for k in methods] + \
            [f"{main} / best SDPA, fwd"]
        return out + [md_table(table, cols, heads), "",
                      "TFLOP/s count 4*d*heads per attended (causal) pair forward, 2.5x that "
                      "backward (bench_attention.py). SDPA runs document by document on packed "
                      "rows; the goal is ours / best >= 0.90.", ""]

    def step_tables(self, steps):
        def fmt(r):
            ok = r.get("status") == "ok"
            return dict(impl=r["impl"], tokens=r["tokens"], recompute=r.get("recompute", ""),
                        frames=f"{r['frames']} in {r['samples']}" if "frames" in r else "",
                        step_s=f"{r['step_s']:.3f}" if ok else "",
                        n=r.get("steps", ""),
                        tok_s=f"{r['tokens_per_s']:.0f}" if ok else "",
                        tflops=f"{r['tflops']:.4g}" if ok else "",
                        mfu=f"{100 * r['mfu']:.1f}%" if ok and "mfu" in r else "",
                        mem=f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "",
                        loss=f"{r['loss']:.3f}" if ok else "",
                        status=_short(r.get("status", "")))
        cols = ["impl", "tokens", "recompute", "frames", "step_s", "n", "tok_s", "tflops", "mfu",
                "mem", "loss", "status"]
        heads = ["implementation", "tokens", "recompute", "frames in samples", "step s (median)",
                 "steps",
                 "tokens/s", "model TFLOP/s", "MFU", "peak GiB", "loss", "status"]
        main = [r for r in steps if not r.get("ladder")]
        lad = [r for r in steps if r.get("ladder")]
        out = ["## (b, c) training step: qwen2-1.5b + SigLIP-so400m, packed video row, bf16",
               "", md_table([fmt(r) for r in main], cols, heads), ""]
        # ratio: ours vs the fastest reference at each length (each in its cheapest mode)
        ratio_rows = []
        for L in sorted({r["tokens"] for r in main}):
            ok = [r for r in main if r["tokens"] == L and r.get("status") == "ok"]
            ours = [r for r in ok if r["impl"] == "ours"]
            hf = sorted((r for r in ok if r["impl"].startswith("hf")),
                        key=lambda r: -r["tokens_per_s"])
            row = dict(tokens=L, ours=f"{ours[0]['tokens_per_s']:.0f} ({ours[0]['recompute']})"
                       if ours else "-",
                       hf=f"{hf[0]['tokens_per_s']:.0f} ({hf[0]['impl'][4:-1]}, "
                          f"{hf[0]['recompute']})" if hf else "-",
                       ratio=f"**{ours[0]['tokens_per_s'] / hf[0]['tokens_per_s']:.2f}x**"
                       if ours and hf else "-")
            same = [h for h in hf if ours and h["recompute"] == ours[0]["recompute"]]
            row["same"] = (f"{ours[0]['tokens_per_s'] / same[0]['tokens_per_s']:.2f}x"
                           if same else "-")
            ratio_rows.append(row)
        out += ["tokens/s, ours over the fastest reference (goal: >= 1.5x at 32k; MFU > 45%):",
                "", md_table(ratio_rows, ["tokens", "ours", "hf", "ratio", "same"],
                             ["tokens", "ours tokens/s (recompute)",
                              "best HF reference tokens/s (attention, recompute)",
                              "ours / HF", "ours / HF, same recompute mode"]), ""]
        parts = [r for r in main if r.get("status") == "ok" and r["impl"] == "ours"]
        if parts:
            p = parts[-1]["flops_parts"]
            out += [f"model FLOPs of the {parts[-1]['tokens']}-token step "
                    f"({parts[-1]['frames']} frames), TFLOP: " +
                    ", ".join(f"{k} {v:.1f}" for k, v in p.items()), ""]
        out += ["## (d) longest sequence on one GPU, full recompute (one video sample per row)",
                "",
                md_table([fmt(r) for r in lad], cols, heads), ""]
        for impl in sorted({r["impl"] for r in lad}):
            ok = [r["tokens"] for r in lad if r["impl"] == impl and r.get("status") == "ok"]
            bad = [r for r in lad if r["impl"] == impl and r.get("status") != "ok"]
            first_bad = f"; next rung {bad[0]['tokens']}: {_short(bad[0]['status'])}" if bad else \
                "; every rung tried fit (the ladder's top)"
            out.append(f"- {impl}: longest that trains: **{max(ok) if ok else 'none'}** "
                       f"tokens{first_bad}")
        out.append("")
        return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=480.0)
    p.add_argument("--lengths", default="8192,32768")
    p.add_argument("--ladder", default="32768,65536,98304,131072,196608,262144")
    p.add_argument("--attn-seqlens", default="8192,32768,131072")
    p.add_argument("--attn-max-s", type=float, default=150.0)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ladder-steps", type=int, default=2, help="timed steps per rung (+1 warm-up)")
    p.add_argument("--frames-per-sample", type=int, default=32)
    p.add_argument("--text-per-sample", type=int, default=256)
    p.add_argument("--grace-s", type=float, default=20.0)
    p.add_argument("--min-phase-s", type=float, default=25.0)
    p.add_argument("--phases", default="attention,ours,hf,hf_packed",
                   help="comma list of attention, ours, hf, hf_packed")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model and shapes")
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.ladder = "128,256", "256,384"
        args.attn_seqlens = "1024,2048"  # bench_attention divides by 32 on the CPU
        args.steps, args.warmup, args.ladder_steps = 1, 1, 1
        args.frames_per_sample, args.text_per_sample = 4, 24
        args.min_phase_s = 5.0
        args.phases = args.phases.replace(",hf_packed", "")
    return args


def main(argv=None):
    return Driver(parse(argv)).run()


if __name__ == "__main__":
    main()
