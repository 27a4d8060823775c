"""Start-up checks of pretrain_longvila.py: clear errors naming the numbers, before any process
group exists; NaN/Inf losses stop the run with the iteration or are skipped and counted."""

import pytest

from megatron_longvila.arguments import run_config_from_argv
from trainutil import run_cli, train_records


def _check(argv, world=1):
    return run_config_from_argv(argv, world)


def test_defaults_and_derived_values():
    a = _check([])
    assert a.model.name == "tiny" and a.data.data_path is None
    assert a.data.tokenizer_model == "tiny"
    assert a.parallel.data_parallel_size == 1 and a.training.num_micro_batches == 1
    a = _check(["--tensor-model-parallel-size", "2", "--global-batch-size", "8"], world=8)
    assert a.parallel.data_parallel_size == 4 and a.training.num_micro_batches == 2
    # LongVILA's spelling and Megatron's agree; DP = world / (TP x SP)
    a = _check(["--seq-parallel-size", "4", "--seq-parallel-ring-size", "2"], world=8)
    assert a.parallel.context_parallel_size == 4
    assert a.parallel.hierarchical_context_parallel_sizes == [2, 2]
    assert a.parallel.data_parallel_size == 2
    b = _check(["--context-parallel-size", "4", "--hierarchical-context-parallel-sizes", "2", "2"],
               world=8)
    assert b.parallel.ring_size == 2 and b.parallel.data_parallel_size == 2
    assert _check(["--stage", "align"]).training.trainable == ["projector"]
    assert _check(["--stage", "context-extension"]).training.trainable == ["llm"]


def test_run_config_round_trips_through_json_and_refuses_unknown_keys():
    import json

    from megatron_longvila.config import RunConfig
    a = _check(["--seq-parallel-size", "4", "--seq-parallel-ring-size", "2", "--bf16",
                "--stage", "align", "--lr", "3e-4"], world=8)
    d = json.loads(json.dumps(a.to_dict()))
    b = RunConfig.from_dict(d)
    assert b.to_dict() == a.to_dict() and b.arch == a.arch and b.model.dtype == a.model.dtype
    assert b.parallel.ulysses_size == 2 and b.optimizer.lr == 3e-4
    d["parallel"]["ring_sizes"] = 2
    with pytest.raises(ValueError, match="ring_sizes"):
        RunConfig.from_dict(d)


def test_the_layout_owns_the_sequence_length_rule():
    """ring 2 x Ulysses 2 (zigzag) needs lcm(2 x ring, ring x ulysses) = 4, not 8: the trainer
    checks the length with the layout's own rule, and the layout pads to the same quantum."""
    from megatron_longvila.parallel.layout import SequenceLayout, sequence_quantum
    flags = ["--context-parallel-size", "4", "--seq-parallel-ring-size", "2"]
    assert _check(flags + ["--seq-length", "100"], world=4).training.seq_length == 100
    assert sequence_quantum(2, 2, "zigzag_ring_varlen") == 4
    assert SequenceLayout([0, 100], ring=2, ulysses=2).padded_len == 100
    assert sequence_quantum(2, 2, "zigzag_ring_varlen", multiple_of=2) == 8
    assert sequence_quantum(4, 1, "zigzag_ring_varlen") == 8
    assert sequence_quantum(4, 1, "ring_varlen") == 4


@pytest.mark.parametrize("argv,world,needle", [
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, "--global-batch-size 6"),
    (["--global-batch-size", "6"], 4, "data-parallel size 4"),
    (["--tensor-model-parallel-size", "3"], 4, "does not divide the world size 4"),
    (["--context-parallel-size", "3"], 3, "attention heads"),  # tiny: 4 heads
    (["--tensor-model-parallel-size", "8"], 8, "attention heads 4"),
    (["--context-parallel-size", "4", "--seq-parallel-ring-size", "3"], 4, "ring size 3"),
    (["--context-parallel-size", "2", "--seq-parallel-size", "4"], 4, "disagree"),
    (["--context-parallel-size", "4", "--seq-parallel-ring-size", "2", "--seq-length", "102"], 4,
     "multiple of 4"),
    (["--context-parallel-size", "4", "--seq-parallel-ring-size", "4", "--seq-length", "100"], 4,
     "multiple of 8"),
    (["--pipeline-model-parallel-size", "2"], 2, "pipeline"),
    (["--load", "/nonexistent/ckpt"], 1, "/nonexistent/ckpt"),
    (["--data-path", "/nonexistent/shards"], 1, "/nonexistent/shards"),
    (["--bf16", "--fp16"], 1, "exclusive"),
    (["--lr-warmup-iters", "5", "--train-iters", "4"], 1, "--lr-warmup-iters 5"),
    (["--seq-length", "100000"], 1, "max position embeddings 8192"),
])
def test_bad_flags_fail_early_with_the_numbers(argv, world, needle):
    with pytest.raises(ValueError) as e:
        _check(argv, world)
    assert needle in str(e.value), str(e.value)


def test_load_dir_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="latest_checkpointed_iteration.txt"):
        _check(["--load", str(tmp_path)])
    # resuming into the directory being saved to is fine before its first checkpoint
    _check(["--load", str(tmp_path), "--save", str(tmp_path)])


def test_nan_loss_stops_or_is_skipped(tmp_path):
    common = ["--train-iters", 3, "--seq-length", 128, "--num-workers", 0,
              "--synthetic-videos", 8, "--debug-nan-at-iteration", 2]
    p = run_cli(common + ["--synthetic-dir", tmp_path / "d1"], check=False)
    assert p.returncode != 0
    assert "iteration 2: loss nan" in p.stdout, p.stdout[-3000:]
    m = tmp_path / "skip.jsonl"
    p = run_cli(common + ["--synthetic-dir", tmp_path / "d2", "--on-nan", "skip",
                          "--metrics-file", m])
    recs = train_records(m)
    assert [r["iteration"] for r in recs] == [1, 2, 3]
    assert [r["skipped_iterations"] for r in recs] == [0, 1, 1]
    assert recs[1]["grad_norm"] != recs[1]["grad_norm"]  # NaN: no update
    assert all(r["loss"] == r["loss"] for r in (recs[0], recs[2]))


def test_sequence_parallel_needs_transformer_engine():
    from megatron_longvila.models.specs import te_available
    if te_available():
        pytest.skip("transformer-engine installed")
    with pytest.raises(ValueError, match="transformer_engine"):
        _check(["--tensor-model-parallel-size", "2", "--sequence-parallel"], world=2)
