"""Sharded state saved and loaded with Megatron-Core dist checkpointing (torch_dist backend).

:func:`save_sharded` is the one writer of an ``iter_NNNNNNN`` / ``release`` folder: every rank
writes its shards (and its per-rank JSON state) into ``SAVE/.tmp_<name>``; rank 0 then fsyncs,
renames it into place (:func:`megatron_longvila.utils.atomic.commit_dir`) and only then writes
the config and the tracker. The staging folder is named by the checkpoint, not by a pid,
because all ranks write into it; the next save removes any leftover.
"""

import errno
import json
import os
import shutil
from typing import Any, Callable, Dict, Optional, Union

import psutil  # noqa: F401 - Megatron-Core's torch_dist writer hangs on the CPU without it
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
from megatron.core.dist_checkpointing.validation import StrictHandling

from ..utils.atomic import commit_dir, fsync_dir, fsync_tree, remove_all_staging
from .files import (FORMAT_VERSION, RANK_STATE_DIR, RELEASE, checkpoint_dir, checkpoint_name,
                    read_tracker, write_config, write_tracker)
from .verify import (FAILURES, CheckpointError, check_shapes, root_cause, verify_checkpoint,
                     write_probe)


# ------------------------------------------------------------------ ranks and layout

def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def unwrap_model(model):
    """The LongVILAModel inside DDP / Float16Module wrappers (or a one-element list)."""
    if isinstance(model, (list, tuple)):
        assert len(model) == 1, "one model chunk expected (no pipeline/virtual parallelism)"
        model = model[0]
    while hasattr(model, "module"):
        model = model.module
    return model


def current_layout() -> Dict[str, int]:
    ps = parallel_state
    return dict(world=dist.get_world_size() if dist.is_initialized() else 1,
                tp=ps.get_tensor_model_parallel_world_size(),
                cp=ps.get_context_parallel_world_size(),
                dp=ps.get_data_parallel_world_size(),
                pp=ps.get_pipeline_model_parallel_world_size())


def layout_ranks() -> Dict[str, int]:
    """This process's rank in the world and in its TP / CP / DP groups."""
    ps = parallel_state
    return dict(rank=rank(), tp_rank=ps.get_tensor_model_parallel_rank(),
                cp_rank=ps.get_context_parallel_rank(), dp_rank=ps.get_data_parallel_rank())


# Megatron-Core's distributed optimizer formats (``distrib_optim_sharding_type``); 0.16 saves
# two of them (its older "fully_sharded_model_space" needs ShardedTensor.flattened_range, which
# 0.16's checkpointing refuses):
#   dp_reshardable    (default, Megatron-LM's): each rank writes its own shard of the flat
#                     optimizer buffers, no communication; loads at another data-parallel size
#                     (the shards span DP x SP), not at another TP size.
#   fully_reshardable (--dist-ckpt-optim-fully-reshardable): the shards are gathered over DP
#                     and written as one tensor per parameter in model space, so it loads at any
#                     TP x SP x DP layout; costs a gather and host memory of the whole state.
# A plain (non-distributed) optimizer ignores the key: its state is always in model space.
OPTIM_SHARDING_TYPES = ("dp_reshardable", "fully_reshardable")


def sharded_metadata(optim_sharding: str = "dp_reshardable") -> Dict[str, Any]:
    """The ``metadata`` passed to every ``sharded_state_dict`` call (model and optimizer)."""
    if optim_sharding not in OPTIM_SHARDING_TYPES:
        raise ValueError(f"distributed optimizer sharding {optim_sharding!r}: expected one of "
                         f"{', '.join(OPTIM_SHARDING_TYPES)}")
    md = {"distrib_optim_sharding_type": optim_sharding,
          "chained_optim_avoid_prefix": True,
          "singleton_local_shards": False}
    if optim_sharding == "fully_reshardable" and not torch.cuda.is_available():
        # the default gather goes through the device (NCCL); without CUDA gather over gloo
        md["distrib_optim_fully_reshardable_mem_efficient"] = True
    return md


def model_sharded_state_dict(model):
    return unwrap_model(model).sharded_state_dict(metadata=sharded_metadata())


def model_common_state(iteration: Union[int, str], layout: Dict[str, int]) -> Dict[str, Any]:
    """The common (non-tensor) state of a model-only checkpoint."""
    return {"format_version": FORMAT_VERSION, "layout": dict(layout),
            "iteration": 0 if iteration == RELEASE else int(iteration)}


def _save_strategy():
    # torch_dist, one writer thread per rank. (The default async writer forks a worker that
    # needs psutil; without psutil the worker dies and the save waits forever.)
    _in_process_results_queue()
    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)


def _in_process_results_queue():
    """Our saves are synchronous: Megatron's writer puts its results and reads them back in
    this very process. Its default results queue lives in a ``multiprocessing.Manager`` server
    process (plus a resource tracker) that outlives an ``os._exit``/SIGKILL of the trainer and
    holds its stdout open (``pretrain_longvila.py ... | cat`` never ends): give it a plain
    in-process queue instead, so a save leaves no process behind."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async
    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


# ------------------------------------------------------------------ save

def save_sharded(save_dir: str, iteration: Union[int, str], sharded_sd: Dict[str, Any],
                 rank_state: Optional[dict] = None, config=None, keep_last: Optional[int] = None,
                 before_commit: Optional[Callable[[str], None]] = None) -> str:
    """Save ``sharded_sd`` as ``save_dir/<checkpoint_name(iteration)>`` (collective).

    ``rank_state``: this rank's JSON-able state, stored as ``longvila_rank_state/rank_NNNNN.json``.
    ``config``: written as ``longvila_config.json``. ``keep_last``: prune older ``iter_*``.
    ``before_commit(staging_dir)``: called on rank 0 once every file is written and fsynced,
    just before the rename (fault-injection tests). Returns the checkpoint's directory.
    """
    name = checkpoint_name(iteration)
    final = os.path.join(save_dir, name)
    tmp = os.path.join(save_dir, f".tmp_{name}")
    try:
        if rank() == 0:
            os.makedirs(save_dir, exist_ok=True)
            for entry in os.listdir(save_dir):  # leftovers of interrupted saves
                if entry.startswith(".tmp_") or entry.startswith(".old_"):
                    shutil.rmtree(os.path.join(save_dir, entry), ignore_errors=True)
            remove_all_staging(save_dir)
            os.makedirs(tmp)
        barrier()
        dist_checkpointing.save(sharded_sd, tmp, sharded_strategy=_save_strategy())
        if rank_state is not None:
            rdir = os.path.join(tmp, RANK_STATE_DIR)
            os.makedirs(rdir, exist_ok=True)
            with open(os.path.join(rdir, f"rank_{rank():05d}.json"), "w") as f:
                json.dump(rank_state, f)
                f.flush()
                os.fsync(f.fileno())
        barrier()
        if rank() == 0:
            fsync_tree(tmp)  # every rank's files are in the (shared) directory by now
            if before_commit is not None:
                before_commit(tmp)
            commit_dir(tmp, final, replace=True, fsync=False)  # the same iteration: replaced
            write_config(save_dir, config)
            write_tracker(save_dir, iteration)
            if keep_last:
                prune(save_dir, keep_last, keep=name)
    except FAILURES as e:  # disk full, read-only, I/O error: one line
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = root_cause(e)
        if os.path.isdir(save_dir) and not cause.startswith(tuple(os.strerror(n) for n in (
                errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EFBIG, errno.EDQUOT))):
            cause = write_probe(save_dir) or cause  # the library's error hides the OS one
        raise CheckpointError(f"saving checkpoint {final} failed: {cause}; "
                              f"{_latest_note(save_dir)}") from e
    barrier()
    return final


def _latest_note(save_dir: str) -> str:
    try:
        return f"the last complete checkpoint is still {checkpoint_name(read_tracker(save_dir))}"
    except (OSError, ValueError):
        return f"no complete checkpoint in {save_dir}"


def prune(save_dir: str, keep_last: int, keep: str):
    """Remove all but the newest ``keep_last`` ``iter_*`` folders (never ``keep``)."""
    iters = sorted(e for e in os.listdir(save_dir) if e.startswith("iter_"))
    for e in iters[:-keep_last]:
        if e != keep:
            shutil.rmtree(os.path.join(save_dir, e), ignore_errors=True)
    fsync_dir(save_dir)


def save_model_checkpoint(model, save_dir: str, iteration: Union[int, str] = RELEASE,
                          config=None) -> str:
    """Save the model's weights only (e.g. a converted HF checkpoint) as ``SAVE/release``.

    Collective over all ranks of the (initialised) parallel state. ``pretrain_longvila.py
    --load`` reads it as weights (iteration 0, fresh optimizer).
    """
    sd = dict(model_common_state(iteration, current_layout()),
              model=model_sharded_state_dict(model))
    if config is None:
        config = getattr(unwrap_model(model), "cfg", None)
    return save_sharded(save_dir, iteration, sd, None, config)


# ------------------------------------------------------------------ load

def read_common_state(load_dir: str, iteration=None) -> Dict[str, Any]:
    """The small non-tensor part (iteration, args, layout, scheduler) without loading tensors."""
    return dist_checkpointing.load_common_state_dict(checkpoint_dir(load_dir, iteration))


def load_sharded(request: Dict[str, Any], path: str) -> Dict[str, Any]:
    """Load the sharded state dict ``request`` from the checkpoint folder ``path``.

    The folder is checked first (complete, tensors of the requested shapes): a bad checkpoint
    is a :class:`CheckpointError` naming the file or tensor, not a library traceback."""
    verify_checkpoint(path)
    check_shapes(request, path)
    try:
        return dist_checkpointing.load(request, path, strict=StrictHandling.RAISE_UNEXPECTED)
    except FAILURES as e:  # whatever the reader trips on: one line
        raise CheckpointError(f"{path}: cannot be loaded ({root_cause(e)})") from e


def load_model_into(model, sd_model):
    """Copy a loaded model state dict into ``model`` (strict, bar Megatron's _extra_state)."""
    m = unwrap_model(model)
    missing, unexpected = m.load_state_dict(sd_model, strict=False)
    # Megatron-Core's local layers carry no _extra_state; anything else missing is an error
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"checkpoint/model mismatch: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")


def load_model_weights(model, load_dir: str, iteration=None) -> Union[int, str]:
    """Load only the model weights of the checkpoint in ``load_dir`` (any layout)."""
    path = checkpoint_dir(load_dir, iteration)
    sd = load_sharded({"model": model_sharded_state_dict(model)}, path)
    load_model_into(model, sd["model"])
    return read_tracker(load_dir) if iteration is None else iteration


def read_rank_state(path: str, saved_layout: Dict[str, int], now: Dict[str, int]):
    """This rank's saved JSON state; at another layout, that of a rank with the same DP rank.
    None if the checkpoint has no per-rank state."""
    rdir = os.path.join(path, RANK_STATE_DIR)
    if not os.path.isdir(rdir):
        return None
    me = layout_ranks()
    if saved_layout == now:
        candidate = os.path.join(rdir, f"rank_{me['rank']:05d}.json")
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f)
    for name in sorted(os.listdir(rdir)):
        with open(os.path.join(rdir, name)) as f:
            st = json.load(f)
        if st.get("dp_rank") == me["dp_rank"]:
            return st
    return None
