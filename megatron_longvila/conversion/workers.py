"""Gloo process groups for a conversion: one rank in this process, or N spawned ranks.

``--build-model`` uses :func:`run_ranks` to build the TP-sharded model in N processes, spawned
by the project's one bootstrap (:func:`megatron_longvila.launch.spawn`: a file-store
rendezvous, never a TCP port picked free); the streaming paths need a one-rank world
(:func:`init_single_rank`) for Megatron-Core's parallel state.
"""

import torch.distributed as dist
from megatron.core import parallel_state

from .. import launch
from .hf_io import ConversionError


def init_single_rank():
    """A one-rank gloo world in this process (nothing if one is initialised already)."""
    if dist.is_initialized():
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def ensure_model_parallel(tp: int) -> bool:
    """Megatron's parallel state at tensor-parallel size ``tp``; True if created here."""
    if parallel_state.model_parallel_is_initialized():
        have = parallel_state.get_tensor_model_parallel_world_size()
        if have != tp:
            raise RuntimeError(f"model parallel state already initialised with TP={have}")
        return False
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return True


def run_ranks(fn, world: int, *args, in_process: bool = False):
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; returns the results of all ranks.

    ``in_process`` (world 1 only) runs it here, reusing an initialised one-rank world. A
    :class:`ConversionError` in a rank is raised here with its message; any other failure
    (or a rank that dies) as :class:`~megatron_longvila.launch.WorkerError` (a RuntimeError)
    with the rank's traceback.
    """
    if in_process:
        assert world == 1
        init_single_rank()
        return [fn(0, 1, *args)]
    return launch.spawn(fn, world, *args, timeout=None, threads=0, reraise=(ConversionError,))
