"""MM-SP process groups on top of Megatron-Core's parallel state.

LongVILA's sequence-parallel (SP) group *is* Megatron's context-parallel (CP) group. Its ring
size splits it into ``ulysses = sp // ring`` x ``ring`` ranks, which is what Megatron-Core calls
hierarchical context-parallel sizes ``[ulysses, ring]``: level 0 (Ulysses, all-to-all) holds
adjacent CP ranks (inside a node), level 1 (ring, send/recv) holds ranks ``ulysses`` apart.
A rank's CP rank is ``ring_rank * ulysses + ulysses_rank``.

Nothing here creates groups of its own: :func:`initialize_mmsp` calls
``parallel_state.initialize_model_parallel`` and :func:`get_mmsp_groups` reads its groups.
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch.distributed as dist
from megatron.core import parallel_state

from .layout import RING_TYPES  # noqa: F401  (re-exported)


def validate_mmsp_sizes(world_size: int, tp: int, cp: int, ring: int, num_heads: int,
                        num_kv_heads: Optional[int] = None, pp: int = 1) -> int:
    """Check an MM-SP configuration; return the Ulysses size ``cp // ring``.

    Raises ``ValueError`` naming the offending numbers. ``num_kv_heads`` defaults to
    ``num_heads`` (no grouped-query attention).
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for name, val in (("world size", world_size), ("tensor-parallel size", tp),
                      ("pipeline-parallel size", pp), ("sequence-parallel size", cp),
                      ("sequence-parallel ring size", ring), ("attention heads", num_heads),
                      ("KV heads", num_kv_heads)):
        if int(val) < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(
            f"sequence-parallel size {cp} x tensor-parallel size {tp} x pipeline-parallel size "
            f"{pp} = {tp * pp * cp} does not divide the world size {world_size}")
    if cp % ring != 0:
        raise ValueError(f"sequence-parallel ring size {ring} does not divide the "
                         f"sequence-parallel size {cp}")
    ulysses = cp // ring
    if num_heads % tp != 0:
        raise ValueError(f"attention heads {num_heads} not divisible by tensor-parallel size {tp}")
    if num_kv_heads % tp != 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"KV heads {num_kv_heads} must divide attention heads {num_heads} and "
                         f"be divisible by tensor-parallel size {tp}")
    h, g = num_heads // tp, num_kv_heads // tp
    if h % ulysses != 0:
        raise ValueError(
            f"attention heads per tensor-parallel rank {h} (= {num_heads} / tp {tp}) not "
            f"divisible by the Ulysses size {ulysses} (= sp {cp} / ring {ring})")
    if g % ulysses != 0 and ulysses % g != 0:
        raise ValueError(
            f"KV heads per tensor-parallel rank {g} (= {num_kv_heads} / tp {tp}) and the Ulysses "
            f"size {ulysses} (= sp {cp} / ring {ring}): one must divide the other")
    return ulysses


def hierarchical_sizes(cp: int, ring: int) -> Optional[List[int]]:
    """Megatron's ``hierarchical_context_parallel_sizes`` for an SP size and a ring size."""
    if cp <= 1:
        return None
    return [cp // ring, ring]


def initialize_mmsp(tp: int = 1, cp: int = 1, ring: int = 1, pp: int = 1,
                    num_heads: Optional[int] = None, num_kv_heads: Optional[int] = None,
                    **kwargs):
    """Validate and call Megatron-Core's ``initialize_model_parallel`` with the MM-SP split."""
    world = dist.get_world_size()
    if num_heads is not None:
        validate_mmsp_sizes(world, tp, cp, ring, num_heads, num_kv_heads, pp)
    else:
        validate_mmsp_sizes(world, tp, cp, ring, tp * cp, tp * cp, pp)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        context_parallel_size=cp, hierarchical_context_parallel_sizes=hierarchical_sizes(cp, ring),
        **kwargs)
    return get_mmsp_groups()


@dataclass
class MMSPGroups:
    """The SP group and its Ulysses x ring split, with this rank's coordinates."""
    sp_group: object
    sp_size: int
    sp_rank: int
    ulysses_group: Optional[object]
    ulysses_size: int
    ulysses_rank: int
    ring_group: Optional[object]
    ring_size: int
    ring_rank: int
    ring_global_ranks: List[int]

    @staticmethod
    def cp_rank_of(ulysses_rank: int, ring_rank: int, ulysses_size: int) -> int:
        return ring_rank * ulysses_size + ulysses_rank


def get_mmsp_groups() -> MMSPGroups:
    """Read the SP / Ulysses / ring groups from Megatron-Core's parallel state.

    Without hierarchical CP groups the ring size is 1 (pure Ulysses over the CP group).
    """
    cp_group = parallel_state.get_context_parallel_group()
    cp = parallel_state.get_context_parallel_world_size()
    cp_rank = parallel_state.get_context_parallel_rank()
    hier = None
    if cp > 1:
        try:
            hier = parallel_state.get_hierarchical_context_parallel_groups(check_initialized=False)
        except Exception:  # noqa: BLE001 - not created: pure Ulysses
            hier = None
    if hier:
        u_group, r_group = hier[0], hier[1]
        u_size, r_size = dist.get_world_size(u_group), dist.get_world_size(r_group)
        u_rank, r_rank = dist.get_rank(u_group), dist.get_rank(r_group)
        r_ranks = dist.get_process_group_ranks(r_group)
    else:
        u_group, r_group = cp_group, None
        u_size, r_size, u_rank, r_rank = cp, 1, cp_rank, 0
        r_ranks = [dist.get_rank()] if dist.is_initialized() else [0]
    assert u_size * r_size == cp, (u_size, r_size, cp)
    assert cp_rank == r_rank * u_size + u_rank, "unexpected hierarchical CP rank order"
    return MMSPGroups(cp_group, cp, cp_rank, u_group, u_size, u_rank, r_group, r_size, r_rank,
                      r_ranks)


# ---------------------------------------------------------------- command-line flags

def add_mmsp_arguments(parser):
    """Add LongVILA's MM-SP flags (both spellings) to an argparse parser.

    Megatron's own ``--context-parallel-size`` / ``--hierarchical-context-parallel-sizes`` are
    added only if the parser does not define them already. Call :func:`resolve_mmsp_arguments`
    after parsing.
    """
    have = {opt for action in parser._actions for opt in action.option_strings}
    g = parser.add_argument_group("MM-SP (multi-modal sequence parallelism)")
    if "--context-parallel-size" not in have:
        g.add_argument("--context-parallel-size", type=int, default=None)
    if "--hierarchical-context-parallel-sizes" not in have:
        g.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs="+", default=None)
    g.add_argument("--seq-parallel-size", type=int, default=None,
                   help="LongVILA spelling of --context-parallel-size")
    g.add_argument("--seq-parallel-ring-size", type=int, default=None,
                   help="ring size; Ulysses size = sp / ring (LongVILA spelling of "
                        "--hierarchical-context-parallel-sizes ULYSSES RING)")
    g.add_argument("--seq-parallel-ring-type", choices=RING_TYPES, default="zigzag_ring_varlen")
    return parser


def reconcile_mmsp_flags(context_parallel_size: Optional[int], seq_parallel_size: Optional[int],
                         hierarchical_sizes: Optional[List[int]],
                         ring_size: Optional[int]) -> Tuple[int, int]:
    """The SP size and ring size of the two spellings (Megatron's ``--context-parallel-size`` /
    ``--hierarchical-context-parallel-sizes ULYSSES RING``, LongVILA's ``--seq-parallel-size`` /
    ``--seq-parallel-ring-size``); ``None`` = not given. Disagreeing values raise
    ``ValueError`` naming both flags. Sizes are checked by :func:`validate_mmsp_sizes`."""
    cp_a, cp_b = context_parallel_size, seq_parallel_size
    if cp_a is not None and cp_b is not None and cp_a != cp_b and not (cp_a == 1 and cp_b > 1):
        raise ValueError(f"--context-parallel-size {cp_a} and --seq-parallel-size {cp_b} disagree")
    cp = cp_b if cp_b is not None else (cp_a if cp_a is not None else 1)
    hier, ring = hierarchical_sizes, ring_size
    if ring is not None and ring < 0:  # LongVILA's default -1: pure Ulysses
        ring = 1
    if hier:
        if len(hier) != 2:
            raise ValueError(f"--hierarchical-context-parallel-sizes {hier}: MM-SP expects two "
                             "numbers, ULYSSES RING")
        if hier[0] * hier[1] != cp:
            raise ValueError(f"--hierarchical-context-parallel-sizes {hier} multiply to "
                             f"{hier[0] * hier[1]}, not the sequence-parallel size {cp}")
        if ring is not None and ring != hier[1]:
            raise ValueError(f"--seq-parallel-ring-size {ring} and "
                             f"--hierarchical-context-parallel-sizes {hier} disagree")
        ring = hier[1]
    return cp, 1 if ring is None else ring


def resolve_mmsp_arguments(args, world_size: int, tp: int = 1, num_heads: int = 1,
                           num_kv_heads: Optional[int] = None, pp: int = 1):
    """Reconcile the two spellings; set ``args.context_parallel_size``,
    ``args.seq_parallel_ring_size`` and ``args.hierarchical_context_parallel_sizes``.

    Conflicting values or invalid combinations raise ``ValueError`` naming the numbers.
    """
    cp, ring = reconcile_mmsp_flags(getattr(args, "context_parallel_size", None),
                                    getattr(args, "seq_parallel_size", None),
                                    getattr(args, "hierarchical_context_parallel_sizes", None),
                                    getattr(args, "seq_parallel_ring_size", None))
    validate_mmsp_sizes(world_size, tp, cp, ring, num_heads, num_kv_heads, pp)
    args.context_parallel_size = cp
    args.seq_parallel_size = cp
    args.seq_parallel_ring_size = ring
    args.hierarchical_context_parallel_sizes = hierarchical_sizes(cp, ring)
    if getattr(args, "seq_parallel_ring_type", None) is None:
        args.seq_parallel_ring_type = "zigzag_ring_varlen"
    return args
