"""Shared by the GPU check's rows: where they work, how they run the CLIs, what they record.

``GPU_CHECK_WORK`` (a scratch folder, default a temp dir) holds checkpoints and data;
``GPU_CHECK_RECORD`` (a JSON-lines file) receives one record per row: the row's name, what it
measured and the tolerance it held (tools/gpu_check.py turns them into the table).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESET = "qwen2-1.5b"
LLM_LAYERS = 2  # of qwen2-1.5b's 28 (real widths, vocabulary and SigLIP so400m tower)


def work_dir(name: str) -> str:
    base = os.environ.get("GPU_CHECK_WORK") or os.path.join(tempfile.gettempdir(), "gpu_check")
    d = os.path.join(base, name)
    os.makedirs(d, exist_ok=True)
    return d


def record(row: str, **fields):
    path = os.environ.get("GPU_CHECK_RECORD")
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    rec = {"row": row, "test": test, **fields}
    print("GPU_CHECK " + json.dumps(rec, default=str), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")


def env(**extra):
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="4",
             LONGVILA_SYNTHETIC_CACHE=work_dir("synthetic_cache"))
    e["PYTHONPATH"] = ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.pop("RANK", None), e.pop("WORLD_SIZE", None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run(cmd, timeout, log, env_extra=None, check=True):
    """Run a command in its own process group; output to ``log``; returns (rc, output, s)."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env(**(env_extra or {})),
                             stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
    with open(log) as f:
        out = f.read()
    dt = time.time() - t0
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(str(c) for c in cmd)} -> rc {p.returncode} after "
                             f"{dt:.0f}s (timeout {timeout}s):\n{out[-4000:]}")
    return p.returncode, out, dt


def trainer(args, timeout, log, check=True):
    return run([sys.executable, "pretrain_longvila.py"] + list(args), timeout, log, check=check)


def records(metrics_file):
    with open(metrics_file) as f:
        return [json.loads(l) for l in f if l.strip() and '"loss"' in l]


def remove(path):
    shutil.rmtree(path, ignore_errors=True)


def synthetic_seconds(out: str):
    for line in out.splitlines():
        if line.startswith("no --data-path:") and line.rstrip().endswith("s)"):
            return float(line.rsplit("(", 1)[1].rstrip("s)"))
    return None
