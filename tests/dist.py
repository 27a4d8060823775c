"""Run a function in several gloo processes on the CPU (the distributed tests' harness).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes; each calls
``fn(rank, world_size, *args)`` after ``torch.distributed`` is initialised with gloo. The
function's return value of every rank comes back as a list (picklable values only, produced
by our own test code). An exception in any rank fails the caller with that rank's traceback.
"""

import os
import shutil
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, store_file, fn, args, queue, collected):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        # A file store, not a TCP port: a port picked free here can be taken by another
        # suite before rank 0 binds it when many run at once.
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                                world_size=world_size)
        out = fn(rank, world_size, *args)
        queue.put((rank, "ok", out))
        # Tensors on the queue travel as shared-memory file descriptors, which vanish if this
        # process exits before the parent has read them: wait until it has.
        collected.wait(timeout=600)
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state
            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size, *args, timeout=600):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    collected = ctx.Event()
    port = _free_port()
    store_dir = tempfile.mkdtemp(prefix="longvila_dist_")
    store_file = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_worker,
                         args=(r, world_size, port, store_file, fn, args, queue, collected))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, out = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = out
            else:
                errors.append(f"rank {rank}:\n{out}")
                break
    finally:
        collected.set()
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.terminate()
        shutil.rmtree(store_dir, ignore_errors=True)
    if errors:
        raise AssertionError("distributed run failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
