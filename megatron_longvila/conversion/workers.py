"""Gloo process groups for a conversion: one rank in this process, or N spawned ranks.

Rendezvous goes through a file store (never a TCP port picked free, which another job can take
between the pick and the bind). ``--build-model`` uses :func:`run_ranks` to build the
TP-sharded model in N processes; the streaming paths need a one-rank world
(:func:`init_single_rank`) for Megatron-Core's parallel state.
"""

import os
import queue as queue_mod
import shutil
import tempfile
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state

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


def _rank_entry(rank, world, store_file, fn, args, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                                world_size=world)
        out = fn(rank, world, *args)
        results.put((rank, "ok", out))
    except ConversionError as e:
        results.put((rank, "conversion", str(e)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, in_process: bool = False):
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; returns the results of all ranks.

    ``in_process`` (world 1 only) runs it here, reusing an initialised one-rank world. A
    :class:`ConversionError` in a rank is raised here with its message; any other failure
    (or a rank that dies) as a RuntimeError with the rank's traceback.
    """
    if in_process:
        assert world == 1
        init_single_rank()
        return [fn(0, 1, *args)]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="longvila_convert_")
    store_file = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_rank_entry, args=(r, world, store_file, fn, args, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got, error = {}, None
    try:
        while len(got) < world and error is None:
            try:
                rank, status, out = results.get(timeout=5)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    error = ("error", f"a conversion worker died (exit code {dead[0].exitcode})")
                continue
            if status == "ok":
                got[rank] = out
            else:
                error = (status, f"rank {rank}: {out}")
    finally:
        for p in procs:
            p.join(timeout=10 if error else None)
            if p.is_alive():
                p.terminate()
                p.join()
        shutil.rmtree(store_dir, ignore_errors=True)
    if error is not None:
        if error[0] == "conversion":
            raise ConversionError(error[1].split(": ", 1)[1])
        raise RuntimeError("conversion worker failed\n" + error[1])
    return [got[r] for r in range(world)]
