"""GPU check, rows 8-9: SIGKILL during training and during a save, then resume, on the
qwen2-1.5b preset (LLM_LAYERS of 28 layers, real widths) in bf16 with the distributed optimizer
(stage "pretrain": projector + LLM train). The resumed losses are compared with the
uninterrupted run's at a stated bf16 tolerance; the previous checkpoint stays intact."""

import os

import pytest

from gpucheck import LLM_LAYERS, PRESET, record, records, remove, trainer, work_dir

pytestmark = pytest.mark.gpu

ITERS = 4
# The same GPU kernels on the same inputs: a resume is expected to match closely; what may
# differ is the order of atomic adds (embedding backward, attention backward) between runs.
# Tolerance: |loss - loss_ref| <= 2e-2 * |loss_ref| (bf16 has an 8-bit mantissa: 3.9e-3 per
# rounding) and every difference is reported.
REL_TOL = 2e-2
STATE = {}


def _args(save, metrics):
    return ["--model", PRESET, "--num-layers", LLM_LAYERS, "--stage", "pretrain", "--bf16",
            "--use-distributed-optimizer", "--seq-length", 4096, "--global-batch-size", 2,
            "--train-iters", ITERS, "--lr", 1e-4, "--lr-warmup-iters", 1, "--save", save,
            "--save-interval", 2, "--metrics-file", metrics, "--log-interval", 1,
            "--synthetic-videos", 16, "--synthetic-frames", 8, "--num-workers", 2, "--seed", 9]


def _ref():
    if "ref" not in STATE:
        w = work_dir("resume")
        save, m = os.path.join(w, "ref"), os.path.join(w, "ref.jsonl")
        remove(save), remove(m)
        _, out, dt = trainer(_args(save, m), 240, os.path.join(w, "ref.log"))
        STATE["ref"] = {r["iteration"]: r["loss"] for r in records(m)}
        STATE["ref_s"] = dt
        remove(save)  # only its losses are needed
    return STATE["ref"]


def _compare(resumed, ref):
    diffs = {}
    for r in resumed:
        q = ref[r["iteration"]]
        diffs[r["iteration"]] = abs(r["loss"] - q)
        assert abs(r["loss"] - q) <= REL_TOL * abs(q), (r["iteration"], r["loss"], q)
    return diffs


@pytest.mark.timeout(500)
def test_sigkill_during_training_then_resume():
    ref = _ref()
    w = work_dir("resume")
    save, m = os.path.join(w, "killed"), os.path.join(w, "killed.jsonl")
    remove(save), remove(m)
    rc, out, _ = trainer(_args(save, m) + ["--debug-kill-after-iteration", 3], 240,
                         os.path.join(w, "killed.log"), check=False)
    assert rc != 0 and "SIGKILL after iteration 3" in out, out[-3000:]
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "2"
    m2 = os.path.join(w, "resumed.jsonl")
    remove(m2)
    _, out, dt = trainer(_args(save, m2) + ["--load", save], 240, os.path.join(w, "resumed.log"))
    assert "optimizer" in out and "loader" in out
    resumed = records(m2)
    assert [r["iteration"] for r in resumed] == [3, 4]
    diffs = _compare(resumed, ref)
    remove(save)
    record("SIGKILL during training (after it. 3, ckpt 2), resume", seconds=round(dt, 1),
           ref_losses={k: round(v, 5) for k, v in ref.items()},
           resumed_losses={r["iteration"]: round(r["loss"], 5) for r in resumed},
           max_abs_diff=max(diffs.values()), tolerance=f"rel {REL_TOL}",
           note=f"{LLM_LAYERS} of 28 LLM layers, bf16, distributed optimizer")


@pytest.mark.timeout(500)
def test_sigkill_during_save_keeps_previous_then_resume():
    ref = _ref()
    w = work_dir("resume")
    save, m = os.path.join(w, "crash_in_save"), os.path.join(w, "crash.jsonl")
    remove(save), remove(m)
    rc, out, _ = trainer(_args(save, m) + ["--debug-kill-during-save", 4], 240,
                         os.path.join(w, "crash.log"), check=False)
    assert rc != 0 and "SIGKILL during the save" in out, out[-3000:]
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "2"
    assert not os.path.exists(os.path.join(save, "iter_0000004"))
    assert os.path.isfile(os.path.join(save, "iter_0000002", "metadata.json"))
    m2 = os.path.join(w, "after_crash.jsonl")
    remove(m2)
    _, out, dt = trainer(_args(save, m2) + ["--load", save], 240,
                         os.path.join(w, "after_crash.log"))
    resumed = records(m2)
    assert [r["iteration"] for r in resumed] == [3, 4]
    diffs = _compare(resumed, ref)
    assert not [e for e in os.listdir(save) if e.startswith(".tmp_")]
    remove(save)
    record("SIGKILL during the save of it. 4: ckpt 2 intact, resume", seconds=round(dt, 1),
           resumed_losses={r["iteration"]: round(r["loss"], 5) for r in resumed},
           max_abs_diff=max(diffs.values()), tolerance=f"rel {REL_TOL}")
