"""The distributed tests' harness: ``run_distributed(fn, world_size, *args)`` runs
``fn(rank, world_size, *args)`` in ``world_size`` gloo processes joined by a file store and
returns every rank's result; a failing rank fails the caller with its traceback.
It is :func:`megatron_longvila.launch.spawn`, the project's one bootstrap."""

from megatron_longvila.launch import spawn


def run_distributed(fn, world_size, *args, timeout=600):
    return spawn(fn, world_size, *args, timeout=timeout)
