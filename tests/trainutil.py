"""Helpers for the CLI tests: run pretrain_longvila.py (python or torchrun) and read metrics."""

import json
import os
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "pretrain_longvila.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def run_cli(args, nproc=1, timeout=300, check=True, env=None):
    """Run the trainer; returns the CompletedProcess (stdout+stderr in .stdout)."""
    if nproc == 1:
        cmd = [sys.executable, SCRIPT]
    else:
        # --standalone: torchrun's rendezvous binds a port of its own choosing (no port picked
        # free here that another suite could take first)
        cmd = [TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), SCRIPT]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None), e.pop("WORLD_SIZE", None)
    if env:
        e.update(env)
    # Own process group: when the run ends (or is SIGKILLed, or hangs) whatever it leaves
    # behind (ranks, loader workers) is killed with it. Output goes to a file, not a pipe that
    # an orphaned worker could hold open.
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd + [str(a) for a in args], cwd=ROOT, env=e, stdout=log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.seek(0)
        out = log.read()
    if timed_out:
        raise AssertionError(f"{' '.join(cmd + [str(a) for a in args])} timed out after "
                             f"{timeout}s:\n{out[-6000:]}")
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd + [str(a) for a in args])} failed "
                             f"(rc {p.returncode}):\n{p.stdout[-6000:]}")
    return p


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_records(path):
    return [r for r in read_metrics(path) if "loss" in r]
