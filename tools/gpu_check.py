#!/usr/bin/env python3
"""The GPU check in one go: runs tests/gpu (three groups of rows side by side on one GPU),
prints the table and writes it to --out.

    python tools/gpu_check.py --out /tmp/gpu_check_out [--work /tmp/gpu_check_work] [-k EXPR]

Rows (tests/gpu/*.py, pytest marker ``gpu``; each row has its own timeout and a failing row
does not stop the others): the five stages chained through examples/stage*.sh on qwen2-1.5b
(bf16, distributed optimizer, saves, each stage loading the previous one), tools/generate.py
and tools/eval_needle.py on the stage-5 checkpoint; SIGKILL during training and during a save,
then resume; fp16 with loss scaling; HF -> Megatron -> HF at real widths with bf16 logits
against transformers; the README's first command. Output: --out/gpu_check.md (the table),
--out/gpu_check.json (every record), --out/logs_tail.txt (the end of every log).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = ("tests/gpu/test_gpu_stages.py", "tests/gpu/test_gpu_resume.py",
          "tests/gpu/test_gpu_misc.py")


def environment():
    import torch
    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                    gpu_memory_gib=round(p.total_memory / 2 ** 30, 1))
    for mod in ("megatron.core", "transformers", "av", "webdataset"):
        try:
            m = __import__(mod, fromlist=["_"])
            info[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # noqa: BLE001
            info[mod] = f"not importable ({type(e).__name__})"
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        info["driver"] = "?"
    try:
        import transformer_engine  # noqa: F401
        info["transformer_engine"] = "importable (not used: --transformer-impl auto = local)"
    except Exception:  # noqa: BLE001
        info["transformer_engine"] = "absent"
    return info


def junit_cases(path):
    if not os.path.isfile(path):
        return []
    out = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        outcome, msg = "PASS", ""
        for tag, name in (("failure", "FAIL"), ("error", "ERROR"), ("skipped", "SKIP")):
            el = tc.find(tag)
            if el is not None:
                outcome = name
                msg = (el.get("message") or el.text or "").strip().splitlines()[0][:300] \
                    if (el.get("message") or el.text) else ""
                break
        out.append({"file": tc.get("file") or tc.get("classname"), "name": tc.get("name"),
                    "seconds": float(tc.get("time") or 0), "outcome": outcome, "message": msg})
    return out


def _fmt(rec):
    skip = {"row", "test", "seconds"}
    parts = []
    for k, v in rec.items():
        if k in skip:
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{k}={v}")
    return "; ".join(str(p) for p in parts).replace("|", "/")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the table, records and log tails")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k: a subset of rows")
    ap.add_argument("--timeout", type=float, default=540, help="wall-clock limit for all rows")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    work = a.work or os.path.join("/tmp", f"gpu_check_work_{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    info = environment()
    print("environment: " + json.dumps(info), flush=True)
    procs = []
    for i, group in enumerate(GROUPS):
        rec = os.path.join(work, f"records_{i}.jsonl")
        if os.path.exists(rec):
            os.remove(rec)
        cmd = [sys.executable, "-m", "pytest", group, "-m", "gpu", "-q", "-rA",
               f"--junitxml={os.path.join(work, f'junit_{i}.xml')}"]
        if a.keyword:
            cmd += ["-k", a.keyword]
        env = dict(os.environ, GPU_CHECK_RECORD=rec, GPU_CHECK_WORK=os.path.join(work, f"g{i}"),
                   PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log = open(os.path.join(work, f"pytest_{i}.log"), "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))
    deadline = t0 + a.timeout
    for p, log in procs:
        try:
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            print(f"gpu_check: {p.args[3]} still running at the {a.timeout:.0f}s limit: stopped",
                  flush=True)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        log.close()

    rows, records = [], []
    for i, group in enumerate(GROUPS):
        recs = []
        path = os.path.join(work, f"records_{i}.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                recs = [json.loads(l) for l in f if l.strip()]
        records += recs
        cases = junit_cases(os.path.join(work, f"junit_{i}.xml"))
        if not cases:
            rows.append({"row": group, "outcome": "ERROR", "seconds": 0,
                         "details": "no result (the group did not finish: see logs_tail.txt)"})
        for c in cases:
            mine = [r for r in recs if r.get("test", "").endswith("::" + c["name"])]
            name = mine[0]["row"] if mine else f"{os.path.basename(group)}::{c['name']}"
            details = _fmt(mine[0]) if mine else ""
            if c["outcome"] != "PASS":
                details = (c["message"] + (" | " + details if details else "")).replace("|", "/")
            rows.append({"row": name, "outcome": c["outcome"], "seconds": c["seconds"],
                         "details": details})
    wall = time.time() - t0
    lines = ["| # | row | result | s | measured |", "|---|---|---|---|---|"]
    for n, r in enumerate(rows, 1):
        lines.append(f"| {n} | {r['row']} | {r['outcome']} | {r['seconds']:.0f} | "
                     f"{r['details']} |")
    passed = sum(r["outcome"] == "PASS" for r in rows)
    head = (f"GPU check: {passed}/{len(rows)} rows pass in {wall:.0f}s wall "
            f"(three groups side by side on one GPU)\n\n"
            + "\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n\n")
    table = head + "\n".join(lines) + "\n"
    print(table, flush=True)
    with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
        f.write(table)
    with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
        json.dump({"environment": info, "wall_s": wall, "rows": rows, "records": records}, f,
                  indent=1, default=str)
    with open(os.path.join(a.out, "logs_tail.txt"), "w") as out:
        for dirpath, _, names in sorted(os.walk(work)):
            for n in sorted(names):
                if n.endswith(".log"):
                    with open(os.path.join(dirpath, n), errors="replace") as f:
                        tail = f.readlines()[-60:]
                    out.write(f"===== {os.path.join(dirpath, n)}\n{''.join(tail)}\n")
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
