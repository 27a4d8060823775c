"""Exact resume through the CLI: a run SIGKILLed after its checkpoint and resumed gives the same
per-iteration losses as the uninterrupted run, and the loader neither loses nor repeats a sample;
a SIGKILL during a save leaves the previous checkpoint named by the tracker and loadable."""

import os
import signal

import pytest

from trainutil import read_metrics, run_cli, train_records

ITERS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_longvila.data import make_synthetic_dataset
    root = tmp_path_factory.mktemp("resume")
    data = make_synthetic_dataset(str(root / "data"), num_videos=40, num_frames=4, image_size=32,
                                  seed=5, shard_max_samples=8)
    common = ["--data-path", data, "--seq-length", 128, "--micro-batch-size", 1,
              "--global-batch-size", 2, "--train-iters", ITERS, "--lr", 2e-3,
              "--lr-warmup-iters", 2, "--lr-decay-style", "cosine", "--min-lr", 1e-4,
              "--seed", 21, "--num-workers", 2, "--save-interval", 3, "--log-sample-keys"]
    ref_metrics = root / "ref.jsonl"
    run_cli(common + ["--save", root / "ref_ckpt", "--metrics-file", ref_metrics])
    return root, common, train_records(ref_metrics)


def _by_iter(recs):
    return {r["iteration"]: r for r in recs}


def test_sigkill_after_checkpoint_then_resume_is_exact(setup):
    root, common, ref = setup
    save, metrics = root / "killed", root / "killed.jsonl"
    p = run_cli(common + ["--save", save, "--metrics-file", metrics,
                          "--debug-kill-after-iteration", 4], check=False)
    assert p.returncode == -signal.SIGKILL, p.stdout[-3000:]
    first = train_records(metrics)
    assert [r["iteration"] for r in first] == [1, 2, 3, 4]
    with open(save / "latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == "3"
    resumed_metrics = root / "resumed.jsonl"
    p = run_cli(common + ["--save", save, "--load", save, "--metrics-file", resumed_metrics])
    assert "iteration 3" in p.stdout and "loader" in p.stdout
    resumed = train_records(resumed_metrics)
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    want = _by_iter(ref)
    for r in first[:3] + resumed:
        q = want[r["iteration"]]
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-6, abs=1e-7), (r, q)
        assert r["lr"] == pytest.approx(q["lr"], rel=1e-9), (r, q)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-5), (r, q)
        assert r["sample_keys"] == q["sample_keys"], r["iteration"]
        assert r["consumed_samples"] == q["consumed_samples"]
    # no sample lost or repeated: the kept stream is exactly the uninterrupted one
    stream = [k for r in first[:3] + resumed for k in r["sample_keys"]]
    ref_stream = [k for r in ref for k in r["sample_keys"]]
    assert stream == ref_stream
    assert len(set(ref_stream)) == len(ref_stream) >= 2 * ITERS  # within one epoch: no repeats
    # the losses of the run fell
    assert ref[-1]["loss"] < ref[0]["loss"]


def test_sigkill_during_save_keeps_previous_checkpoint(setup):
    root, common, ref = setup
    save, metrics = root / "crash_in_save", root / "crash.jsonl"
    p = run_cli(common + ["--save", save, "--metrics-file", metrics,
                          "--debug-kill-during-save", 6], check=False)
    assert p.returncode == -signal.SIGKILL, p.stdout[-3000:]
    assert "SIGKILL during the save" in p.stdout
    with open(save / "latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == "3"
    assert not (save / "iter_0000006").exists()
    assert (save / ".tmp_iter_0000006").exists()  # the interrupted save, never named
    # the previous checkpoint loads and continues exactly
    m2 = root / "after_crash.jsonl"
    run_cli(common + ["--save", save, "--load", save, "--metrics-file", m2, "--train-iters", 4,
                      "--lr-decay-iters", ITERS])
    rec = train_records(m2)
    assert [r["iteration"] for r in rec] == [4]
    assert rec[0]["loss"] == pytest.approx(_by_iter(ref)[4]["loss"], rel=1e-6, abs=1e-7)
    assert rec[0]["sample_keys"] == _by_iter(ref)[4]["sample_keys"]
    # the next save cleared the leftovers of the interrupted one
    assert not (save / ".tmp_iter_0000006").exists()
    assert (save / "iter_0000004").exists()


def test_resume_at_another_tp_sp_layout(setup):
    """The one-process checkpoint of iteration 3 resumed as TP=2 x SP=2 (4 processes, DP=1:
    the same sample stream): model and optimizer reshard; iterations 4..6 match the
    uninterrupted one-process run."""
    root, common, ref = setup
    m = root / "tp2sp2.jsonl"
    p = run_cli(common + ["--load", root / "ref_ckpt", "--ckpt-step", 3, "--save", root / "tp2sp2",
                          "--metrics-file", m, "--tensor-model-parallel-size", 2,
                          "--context-parallel-size", 2], nproc=4, timeout=300)
    assert "optimizer" in p.stdout and "loader" in p.stdout, p.stdout[-3000:]
    recs = train_records(m)
    assert [r["iteration"] for r in recs] == [4, 5, 6]
    want = _by_iter(ref)
    for r in recs:
        q = want[r["iteration"]]
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-5, abs=1e-6), (r, q)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-4), (r, q)
        assert r["sample_keys"] == q["sample_keys"]
