"""MM-SP sizes, flags (both spellings) and groups on Megatron-Core's hierarchical CP groups."""

import argparse

import pytest

from megatron_longvila.parallel.groups import (add_mmsp_arguments, resolve_mmsp_arguments,
                                               validate_mmsp_sizes)


def test_valid_sizes_return_ulysses_size():
    assert validate_mmsp_sizes(8, 1, 8, 2, 32, 8) == 4
    assert validate_mmsp_sizes(16, 2, 8, 8, 32, 8) == 1
    assert validate_mmsp_sizes(8, 1, 8, 1, 32, 2) == 8   # KV heads replicated 4x
    assert validate_mmsp_sizes(4, 2, 2, 1, 4, 2) == 2    # TP=2 x SP=2, 1 KV head per TP rank


@pytest.mark.parametrize("args,words", [
    ((12, 1, 8, 2, 32, 8), ["8", "12"]),                 # SP does not divide the world
    ((16, 1, 8, 3, 32, 8), ["ring size 3", "8"]),        # ring does not divide SP
    ((8, 1, 8, 1, 12, 12), ["12", "Ulysses size 8"]),   # heads not divisible by Ulysses
    ((8, 1, 4, 1, 12, 6), ["KV heads", "6", "Ulysses size 4"]),  # kv 6 vs ulysses 4
    ((8, 2, 4, 1, 8, 3), ["KV heads 3"]),                # kv not divisible by tp
])
def test_invalid_sizes_name_the_numbers(args, words):
    with pytest.raises(ValueError) as e:
        validate_mmsp_sizes(*args)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def _parse(argv):
    p = argparse.ArgumentParser()
    add_mmsp_arguments(p)
    return p.parse_args(argv)


def test_flags_in_both_spellings_agree():
    a = resolve_mmsp_arguments(_parse(["--seq-parallel-size", "8", "--seq-parallel-ring-size", "2"]),
                               world_size=8, num_heads=32, num_kv_heads=8)
    b = resolve_mmsp_arguments(_parse(["--context-parallel-size", "8",
                                       "--hierarchical-context-parallel-sizes", "4", "2"]),
                               world_size=8, num_heads=32, num_kv_heads=8)
    for x in (a, b):
        assert (x.context_parallel_size, x.seq_parallel_ring_size) == (8, 2)
        assert x.hierarchical_context_parallel_sizes == [4, 2]
        assert x.seq_parallel_ring_type == "zigzag_ring_varlen"
    c = resolve_mmsp_arguments(_parse(["--seq-parallel-size", "4", "--seq-parallel-ring-type",
                                       "ring_varlen"]), world_size=4, num_heads=4)
    assert c.seq_parallel_ring_size == 1 and c.seq_parallel_ring_type == "ring_varlen"
    with pytest.raises(ValueError, match="disagree"):
        resolve_mmsp_arguments(_parse(["--seq-parallel-size", "8", "--seq-parallel-ring-size", "4",
                                       "--hierarchical-context-parallel-sizes", "4", "2"]),
                               world_size=8, num_heads=32)
    with pytest.raises(ValueError, match="multiply to 6"):
        resolve_mmsp_arguments(_parse(["--context-parallel-size", "8",
                                       "--hierarchical-context-parallel-sizes", "3", "2"]),
                               world_size=8, num_heads=32)
    with pytest.raises(SystemExit):
        _parse(["--seq-parallel-ring-type", "bogus"])


# The groups themselves (Megatron-Core's hierarchical CP groups: Ulysses = adjacent ranks,
# ring = ranks `ulysses` apart) are checked in test_attention_mmsp.py's gloo runs, which build
# them anyway (one set of processes less).
