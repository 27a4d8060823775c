"""Megatron-Core's distributed optimizer (--use-distributed-optimizer) on gloo, through the CLI:
DP=2 saves its sharded state (Megatron-Core 0.16's dp_reshardable / fully_reshardable formats),
a SIGKILL during a save keeps the previous checkpoint and the resume from it is exact, and the
DP=2 state loads at DP=1 (dp_reshardable) and at TP=2 (fully_reshardable), continuing the same
trajectory as DP=2."""

import signal

import pytest

from trainutil import run_cli, train_records

ITERS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_longvila.data import make_synthetic_dataset
    root = tmp_path_factory.mktemp("distopt")
    data = make_synthetic_dataset(str(root / "data"), num_videos=32, num_frames=4, image_size=32,
                                  seed=7, shard_max_samples=8)
    common = ["--data-path", data, "--seq-length", 128, "--micro-batch-size", 1,
              "--global-batch-size", 2, "--train-iters", ITERS, "--lr", 3e-3,
              "--lr-warmup-iters", 1, "--min-lr", 1e-4, "--seed", 3, "--save-interval", 2,
              "--log-sample-keys", "--use-distributed-optimizer"]
    ref_m = root / "ref.jsonl"
    p = run_cli(common + ["--num-workers", 1, "--save", root / "ref", "--metrics-file", ref_m],
                nproc=2, timeout=600)
    assert "DP=2" in p.stdout
    return root, common, train_records(ref_m)


def _by_iter(recs):
    return {r["iteration"]: r for r in recs}


def test_distributed_optimizer_sigkill_during_save_then_exact_resume(setup):
    root, common, ref = setup
    assert ref[-1]["loss"] < ref[0]["loss"]
    save, m = root / "killed", root / "killed.jsonl"
    p = run_cli(common + ["--num-workers", 1, "--save", save, "--metrics-file", m,
                          "--debug-kill-during-save", 4], nproc=2, check=False, timeout=600)
    assert p.returncode != 0 and "SIGKILL during the save" in p.stdout, p.stdout[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert not (save / "iter_0000004").exists()
    m2 = root / "resumed.jsonl"
    p = run_cli(common + ["--num-workers", 1, "--save", save, "--load", save,
                          "--metrics-file", m2], nproc=2, timeout=600)
    assert "optimizer" in p.stdout and "loader" in p.stdout, p.stdout[-3000:]
    resumed = train_records(m2)
    assert [r["iteration"] for r in resumed] == [3, 4]
    want = _by_iter(ref)
    for r in resumed:
        q = want[r["iteration"]]
        assert r["sample_keys"] == q["sample_keys"]
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-6, abs=1e-7), (r, q)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-5), (r, q)


def _continue_from(root, common, name, load, nproc, extra):
    m = root / f"{name}.jsonl"
    p = run_cli(common + ["--load", load, "--ckpt-step", 2, "--no-load-loader-state",
                          "--save", root / name, "--metrics-file", m] + extra,
                nproc=nproc, timeout=600)
    assert "optimizer" in p.stdout, p.stdout[-3000:]
    recs = train_records(m)
    assert [r["iteration"] for r in recs] == [3, 4]
    return recs


def _same_trajectory(a, b, rel=2e-5):
    for x, y in zip(a, b):
        # the same global batch (DP=2 x 1 loader worker reads the same halves of the data as
        # DP=1 x 2 workers), so the same losses up to the order of the gradient sums
        assert sorted(x["sample_keys"]) == sorted(y["sample_keys"]), x["iteration"]
        assert x["loss"] == pytest.approx(y["loss"], rel=rel), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), (x, y)


def test_distributed_optimizer_state_reshards_to_dp1(setup):
    """dp_reshardable (the default): the DP=2 shards of iteration 2 load at DP=1 and the run
    continues as DP=2 does from the same checkpoint (loader restarted in both)."""
    root, common, ref = setup
    dp2 = _continue_from(root, common, "dp2_again", root / "ref", 2, ["--num-workers", 1])
    dp1 = _continue_from(root, common, "dp1", root / "ref", 1, ["--num-workers", 2])
    _same_trajectory(dp1, dp2)
    # the optimizer state mattered: without it iteration 3 differs
    fresh = root / "fresh.jsonl"
    run_cli(common + ["--load", root / "ref", "--ckpt-step", 2, "--no-load-loader-state",
                      "--no-load-optim", "--metrics-file", fresh, "--num-workers", 2],
            nproc=1, timeout=600)
    assert train_records(fresh)[1]["loss"] != pytest.approx(dp1[1]["loss"], rel=1e-4)


def test_distributed_optimizer_fully_reshardable_loads_at_tp2(setup):
    """--dist-ckpt-optim-fully-reshardable: DP=2 saves model-space state, which loads at TP=2
    (DP=1) and continues as DP=1 does from the dp_reshardable checkpoint of the same state."""
    root, common, ref = setup
    full = root / "full"
    m = root / "full.jsonl"
    run_cli(common + ["--num-workers", 1, "--save", full, "--metrics-file", m, "--train-iters", 2,
                      "--lr-decay-iters", ITERS, "--dist-ckpt-optim-fully-reshardable"],
            nproc=2, timeout=600)
    for r in train_records(m):
        assert r["loss"] == pytest.approx(_by_iter(ref)[r["iteration"]]["loss"], rel=1e-6)
    tp2 = _continue_from(root, common, "tp2", full, 2,
                         ["--num-workers", 2, "--tensor-model-parallel-size", 2])
    dp1 = train_records(root / "dp1.jsonl") if (root / "dp1.jsonl").exists() else \
        _continue_from(root, common, "dp1", root / "ref", 1, ["--num-workers", 2])
    _same_trajectory(tp2, dp1)
    # dp_reshardable state cannot change TP: a one-line error, before any tensor is read
    p = run_cli(common + ["--load", root / "ref", "--ckpt-step", 2, "--no-load-loader-state",
                          "--tensor-model-parallel-size", 2, "--num-workers", 2],
                nproc=2, check=False, timeout=600)
    assert p.returncode != 0 and "dp_reshardable at TP=1" in p.stdout, p.stdout[-3000:]
