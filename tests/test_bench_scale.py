"""CPU smoke of the issue-9 driver (tools/benchmarks/bench_scale.py): 4 gloo processes, the
tiny model. Every layout of 4 ranks (MM-SP 2D 2x2, ring_varlen, zigzag, Ulysses) must give
attention, step and ladder rows; the trainer's losses at every layout must match the N=1 run
and the control run (another seed) must be flagged; an out-of-memory error raised on one rank
only must end that layout's ladder without losing the other rows."""

import json
import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

import bench_scale  # noqa: E402

LAYOUTS = ["mmsp-2d U2xR2", "ring_varlen R4", "zigzag R4", "ulysses U4"]


def test_layout_plan_and_head_limits():
    names = [x["name"] for x in bench_scale.plan_layouts(8, 12, 2)]  # qwen2-1.5b heads on 8
    assert names == ["mmsp-2d U4xR2", "mmsp-2d U2xR4", "ring_varlen R8", "zigzag R8",
                     "ulysses U8"]
    bad = {x["name"]: x["invalid"] for x in bench_scale.plan_layouts(8, 12, 2)}
    assert bad["ulysses U8"] and "Ulysses size 8" in bad["ulysses U8"]
    assert not any(bad[n] for n in names[:-1])
    assert [x["name"] for x in bench_scale.plan_layouts(2, 12, 2)] == \
        ["ring_varlen R2", "zigzag R2", "ulysses U2"]


def test_compare_losses_flags_a_difference():
    ref = [dict(loss=6.0, grad_norm=2.0), dict(loss=5.5, grad_norm=2.5)]
    same = [dict(loss=6.0 * (1 + 5e-5), grad_norm=2.0), dict(loss=5.5, grad_norm=2.5)]
    assert bench_scale.compare_losses(same, ref, 2, 1e-4, 1e-3)["verdict"] == "MATCHES"
    off = [dict(loss=6.0, grad_norm=2.0), dict(loss=5.5, grad_norm=2.6)]
    assert bench_scale.compare_losses(off, ref, 2, 1e-4, 1e-3)["verdict"] == "DIFFERS"
    assert bench_scale.compare_losses(ref[:1], ref, 2, 1e-4, 1e-3)["verdict"].startswith(
        "INCOMPLETE")


@pytest.mark.timeout(300)
def test_driver_smoke(tmp_path, monkeypatch):
    # rank 1 alone runs out of memory at the 384-token rung of the Ulysses ladder
    monkeypatch.setenv("BENCH_SCALE_FAKE_OOM", "ulysses U4|ladder|384|1")
    out = tmp_path / "out"
    t = time.time()
    res = bench_scale.main(["--out", str(out), "--smoke", "--nproc", "4", "--budget-s", "240"])
    elapsed = time.time() - t
    rows, text = res["rows"], res["text"]
    # the multicast switches are in this process's environment (and so in every child)
    for k, v in bench_scale.NVLS_OFF.items():
        assert os.environ[k] == v
    for name in LAYOUTS:
        got = {(r["kind"], r["tokens"]): r["status"] for r in rows if r.get("layout") == name}
        assert got[("attention", 256)] == "ok", (name, got)
        assert got[("step", 256)] == "ok", (name, got)
        assert got[("ladder", 256)] == "ok", (name, got)
        want = "OOM" if name == "ulysses U4" else "ok"
        assert got[("ladder", 384)] == want, (name, got)
        assert f"| {name} | 256 |" in text  # a row in the attention / step tables
    ok = [r for r in rows if r["kind"] in ("step", "ladder") and r["status"] == "ok"]
    assert len(ok) == 11 and all(r["tokens_per_s"] > 0 and r["tflops_per_gpu"] > 0 for r in ok)
    att = [r for r in rows if r["kind"] == "attention"]
    assert all(r["fwdbwd_tflops_per_gpu"] > 0 for r in att) and len(att) == 4
    assert "- ulysses U4: longest that trains: **256** tokens; next rung 384: OOM" in text
    assert "- zigzag R4: longest that trains: **384** tokens" in text
    # equivalence: every layout matches N=1, the control (another seed) is flagged
    eq = {r["layout"]: r for r in res["equivalence"]}
    for name in LAYOUTS:
        assert eq[name]["verdict"] == "MATCHES", eq[name]
        assert eq[name]["loss_rel"] < 1e-4
    ctrl = [r for r in res["equivalence"] if r["control"]]
    assert len(ctrl) == 1 and ctrl[0]["verdict"] == "flagged (as it must be)", ctrl
    assert "MM-SP / ring_varlen" in text and "stand-in" in text
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert (out / "tables.md").read_text().startswith("# MM-SP on 4 gloo processes")
    print(f"bench_scale smoke: {elapsed:.0f} s")
