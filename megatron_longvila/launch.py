"""Process bootstrap, one for every entry point: the trainer, the evaluation tools, the
converters, the benchmarks and the distributed tests.

* :func:`init_process_group` joins (or makes) the ``torch.distributed`` world: from torchrun's
  environment (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``), from a file-store
  rendezvous (``store_file`` + ``rank`` + ``world_size``: no TCP port is picked, so nothing can
  take it between picking and binding when many runs start at once), or, started plainly, as a
  one-process world (an in-memory store). NCCL on GPUs, gloo on CPUs; on a
  CPU world it switches on :mod:`megatron_longvila.cpu_compat` (a no-op with CUDA).
* :func:`spawn` runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined by
  a file store and returns every rank's result (the multi-rank harness of the tests and the
  converters).
* :func:`shutdown` tears down Megatron's parallel state and the process group.
"""

import datetime
import os
import queue as queue_mod
import shutil
import tempfile
import time
import traceback
from typing import Any, Callable, List, Optional, Sequence, Type

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import cpu_compat


def world_size_from_env() -> int:
    """The world size torchrun announces (1 when started plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_backend(backend: str = "auto") -> str:
    """``auto``: NCCL when CUDA is there, gloo otherwise."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def init_process_group(backend: str = "auto", timeout_minutes: float = 30,
                       store_file: Optional[str] = None, rank: Optional[int] = None,
                       world_size: Optional[int] = None) -> str:
    """Join the process group (see the module docstring); returns the backend. Idempotent.

    ``store_file``: a path every rank of the world names (a file-store rendezvous; give
    ``rank`` and ``world_size``). Without it: torchrun's environment if ``RANK`` is set, else a
    one-process world."""
    backend = resolve_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        cpu_compat.enable()
    if dist.is_initialized():
        return dist.get_backend()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if store_file is not None:  # a rank of spawn() (or any file-store world)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_RANK=os.environ.get("LOCAL_RANK", str(rank)))
        dist.init_process_group(backend, init_method=f"file://{store_file}", rank=rank,
                                world_size=world_size, timeout=timeout)
    elif "RANK" not in os.environ:  # plain `python ...`: a one-process world, in-memory store
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return backend


def shutdown():
    """Destroy Megatron's parallel state (if any) and the process group (if any)."""
    try:
        from megatron.core import parallel_state
        parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001 - nothing to destroy
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


class WorkerError(RuntimeError):
    """A rank of :func:`spawn` failed: ``rank``, ``exc_type`` (the exception's class name),
    ``message`` and the worker's ``traceback`` text."""

    def __init__(self, rank: int, exc_type: str, message: str, tb: str):
        super().__init__(f"rank {rank}:\n{tb}")
        self.rank, self.exc_type, self.message, self.traceback = rank, exc_type, message, tb


def _worker(rank, world_size, store_file, fn, args, results, collected, threads):
    os.environ["LOCAL_RANK"] = str(rank)
    if threads:
        torch.set_num_threads(threads)
    try:
        init_process_group("gloo", store_file=store_file, rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        results.put((rank, None, out))
        # Tensors on the queue travel as shared-memory file descriptors, which vanish if this
        # process exits before the parent has read them: wait until it has.
        collected.wait(timeout=600)
    except BaseException as e:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, (type(e).__name__, str(e)), traceback.format_exc()))
    finally:
        shutdown()


def spawn(fn: Callable, world_size: int, *args, timeout: Optional[float] = 600, threads: int = 1,
          reraise: Sequence[Type[BaseException]] = ()) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks in fresh (spawned)
    processes joined by a file store; return the ranks' results in rank order (picklable values
    produced by our own code).

    A failing rank raises :class:`WorkerError` naming it, with its traceback; if its exception
    class is one of ``reraise`` (matched by name), that class is raised with the worker's
    message instead. A rank that dies without a word (killed, out of memory) or a run longer
    than ``timeout`` seconds (None: no limit) raises :class:`WorkerError` too. ``threads``: torch threads per
    rank (0: torch's default)."""
    ctx = mp.get_context("spawn")
    results, collected = ctx.Queue(), ctx.Event()
    store_dir = tempfile.mkdtemp(prefix="longvila_spawn_")
    store_file = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_worker, args=(r, world_size, store_file, fn, args, results,
                                               collected, threads))
             for r in range(world_size)]
    for p in procs:
        p.start()
    got, error = {}, None
    deadline = None if timeout is None else time.time() + timeout
    try:
        while len(got) < world_size and error is None:
            try:
                rank, exc, out = results.get(timeout=5)
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    error = WorkerError(dead[0][0], "died", f"exit code {dead[0][1]}",
                                        f"exited with code {dead[0][1]} before reporting")
                elif deadline is not None and time.time() > deadline:
                    error = WorkerError(-1, "timeout", f"no result after {timeout}s",
                                        f"timed out after {timeout}s")
                continue
            if exc is None:
                got[rank] = out
            else:
                error = WorkerError(rank, exc[0], exc[1], out)
    finally:
        collected.set()
        for p in procs:
            p.join(timeout=5 if error else timeout)
            if p.is_alive():
                p.terminate()
                p.join()
        shutil.rmtree(store_dir, ignore_errors=True)
    if error is not None:
        for cls in reraise:
            if cls.__name__ == error.exc_type:
                raise cls(error.message)
        raise error
    return [got[r] for r in range(world_size)]
