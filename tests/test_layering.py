"""The library's layering, checked: import-linter's contracts in ``.importlinter``.

A package imports only packages below it (training | evaluation > arguments > config |
conversion > checkpoint > models > data : parallel > kernels > launch > utils/constants/
cpu_compat), so there is no import circle; the attention kernels import no Megatron state.
Breaking a contract makes ``lint-imports`` exit non-zero and this test fail with its report.
"""
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lint_imports():
    exe = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable), "lint-imports")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "importlinter.cli"]


def test_import_contracts_hold():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(_lint_imports() + [os.path.join(ROOT, ".importlinter")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", report)
    assert kept and int(kept.group(1)) >= 2 and int(kept.group(2)) == 0, report


def test_no_sys_path_manipulation():
    """Tools, tests and the library import the installed package; none edits sys.path."""
    offenders = []
    for top in ("megatron_longvila", "tools", "tests", "pretrain_longvila.py"):
        path = os.path.join(ROOT, top)
        files = [path] if path.endswith(".py") else [
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".py")]
        for f in files:
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if re.search(r"sys\.path\.(insert|append)\(", line) and "re.search" not in line:
                        offenders.append(f"{os.path.relpath(f, ROOT)}:{i}")
    assert not offenders, offenders
