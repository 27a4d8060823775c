"""Checkpoints: Megatron-LM's directory layout, Megatron-Core dist checkpointing inside.

Layout of a save directory ``SAVE``::

    SAVE/latest_checkpointed_iteration.txt   "100" (or "release"): the last complete checkpoint
    SAVE/longvila_config.json                LongVILAConfig.to_dict(): the architecture
    SAVE/iter_0000100/                       a Megatron-Core dist checkpoint (torch_dist) of
        {"model": model.sharded_state_dict(),           always
         "optimizer": optimizer.sharded_state_dict(),   training checkpoints
         "opt_param_scheduler", "iteration", "args", "layout", "consumed"}   (common state)
    SAVE/iter_0000100/longvila_rank_state/rank_00003.json
                                             per-rank RNG states and data-loader state (JSON:
                                             nothing from a checkpoint is ever unpickled by us)
    SAVE/release/                            a model-only checkpoint (converted HF weights)

Model and optimizer are sharded tensors in the model's full (unsharded) coordinate space, so a
checkpoint loads at another tensor/sequence/data-parallel layout. RNG states load only at the
same layout; the loader state only at the same data-parallel size.

Crash safety: a checkpoint is written into ``SAVE/.tmp_iter_0000100`` (files fsynced), renamed
to ``iter_0000100`` and only then named by the tracker file (written to a temporary file,
fsynced, renamed). A crash at any point leaves the tracker naming the previous complete
checkpoint; leftovers of an interrupted save are removed by the next save.

Public API: :func:`save_checkpoint`, :func:`load_checkpoint` (training), and for converters
:func:`save_model_checkpoint` / :func:`load_model_weights` / :func:`read_checkpoint_config`.
"""

import base64
import json
import os
import random
import shutil
from typing import Any, Dict, Optional, Union

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.validation import StrictHandling

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "longvila_config.json"
RANK_STATE_DIR = "longvila_rank_state"
RELEASE = "release"
FORMAT_VERSION = 1


# ------------------------------------------------------------------ paths and tracker

def checkpoint_name(iteration: Union[int, str]) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def read_tracker(load_dir: str) -> Union[int, str]:
    """The iteration (int) or ``"release"`` named by ``load_dir``'s tracker file."""
    path = os.path.join(load_dir, TRACKER_FILE)
    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"checkpoint directory {load_dir!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{load_dir!r} holds no {TRACKER_FILE}: not a checkpoint "
                                "directory (or no checkpoint was completed there)")
    with open(path) as f:
        text = f.read().strip()
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number or 'release', got {text!r}")


def checkpoint_dir(load_dir: str, iteration: Union[int, str, None] = None) -> str:
    """The directory of the checkpoint to load (the tracker's, unless ``iteration`` given)."""
    it = read_tracker(load_dir) if iteration is None else iteration
    path = os.path.join(load_dir, checkpoint_name(it))
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise FileNotFoundError(f"checkpoint {path!r} is missing or incomplete")
    return path


def has_checkpoint(load_dir: Optional[str]) -> bool:
    return bool(load_dir) and os.path.isfile(os.path.join(load_dir, TRACKER_FILE))


def _fsync_tree(path: str):
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(root)


def _fsync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: str, text: str):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


# ------------------------------------------------------------------ helpers

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
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


def _layout_ranks() -> Dict[str, int]:
    ps = parallel_state
    return dict(rank=_rank(), tp_rank=ps.get_tensor_model_parallel_rank(),
                cp_rank=ps.get_context_parallel_rank(), dp_rank=ps.get_data_parallel_rank())


def _sharded_metadata() -> Dict[str, Any]:
    # fully_sharded_model_space: optimizer state as tensors in model space, so it reshards
    # over TP/SP/DP like the weights.
    return {"distrib_optim_sharding_type": "fully_sharded_model_space",
            "chained_optim_avoid_prefix": True,
            "singleton_local_shards": False}


def _model_sharded_state_dict(model):
    return unwrap_model(model).sharded_state_dict(metadata=_sharded_metadata())


def _save_strategy():
    # torch_dist, one writer thread per rank. (The default async writer forks a worker that
    # needs psutil; without psutil the worker dies and the save waits forever.)
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
    try:
        import psutil  # noqa: F401
    except ImportError as e:  # pragma: no cover - psutil is a dependency
        raise RuntimeError("Megatron-Core dist checkpointing needs psutil: pip install psutil") from e
    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)


# ------------------------------------------------------------------ RNG state (JSON-able)

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def get_rng_state() -> Dict[str, Any]:
    import numpy as np
    from megatron.core import tensor_parallel
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
        "cuda": _b64(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
        "tracker": {k: _b64(v) for k, v in
                    tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }
    return state


def set_rng_state(state: Dict[str, Any]):
    import numpy as np
    from megatron.core import tensor_parallel
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {k: _unb64(v) for k, v in state["tracker"].items()})


# ------------------------------------------------------------------ save

def _write_config(save_dir: str, config):
    if config is None:
        return
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    _atomic_write_text(os.path.join(save_dir, CONFIG_FILE), json.dumps(d, indent=2) + "\n")


def _save(save_dir: str, iteration, sharded_sd: Dict[str, Any], rank_state: Optional[dict],
          config=None, keep_last: Optional[int] = None):
    name = checkpoint_name(iteration)
    final = os.path.join(save_dir, name)
    tmp = os.path.join(save_dir, f".tmp_{name}")
    if _rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        for entry in os.listdir(save_dir):  # leftovers of interrupted saves
            if entry.startswith(".tmp_") or entry.startswith(".old_"):
                shutil.rmtree(os.path.join(save_dir, entry), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    dist_checkpointing.save(sharded_sd, tmp, sharded_strategy=_save_strategy())
    if rank_state is not None:
        rdir = os.path.join(tmp, RANK_STATE_DIR)
        os.makedirs(rdir, exist_ok=True)
        path = os.path.join(rdir, f"rank_{_rank():05d}.json")
        with open(path, "w") as f:
            json.dump(rank_state, f)
    _barrier()
    if _rank() == 0:
        _fsync_tree(tmp)  # every rank's files are in the (shared) directory by now
        if os.path.exists(final):  # the same iteration saved again: replace it
            old = os.path.join(save_dir, f".old_{name}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(save_dir)
        _write_config(save_dir, config)
        _atomic_write_text(os.path.join(save_dir, TRACKER_FILE), f"{iteration}\n")
        if keep_last:
            _prune(save_dir, keep_last, keep=name)
    _barrier()
    return final


def _prune(save_dir: str, keep_last: int, keep: str):
    iters = sorted(e for e in os.listdir(save_dir) if e.startswith("iter_"))
    for e in iters[:-keep_last]:
        if e != keep:
            shutil.rmtree(os.path.join(save_dir, e), ignore_errors=True)


def save_checkpoint(save_dir: str, iteration: int, model, optimizer=None, scheduler=None,
                    loader=None, args: Optional[dict] = None, config=None,
                    consumed: Optional[dict] = None, keep_last: Optional[int] = None) -> str:
    """Save a training checkpoint (collective: every rank calls it). Returns its directory."""
    model_sd = _model_sharded_state_dict(model)
    sd: Dict[str, Any] = {"model": model_sd, "iteration": int(iteration),
                          "format_version": FORMAT_VERSION, "layout": current_layout()}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False,
                                                       metadata=_sharded_metadata())
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if args is not None:
        sd["args"] = json.loads(json.dumps(args, default=str))
    if consumed is not None:
        sd["consumed"] = dict(consumed)
    rank_state = dict(_layout_ranks(), layout=current_layout(), rng=get_rng_state(),
                      loader=loader.state_dict() if loader is not None else None)
    if config is None:
        config = getattr(unwrap_model(model), "cfg", None)
    return _save(save_dir, iteration, sd, rank_state, config, keep_last)


def save_model_checkpoint(model, save_dir: str, iteration: Union[int, str] = RELEASE,
                          config=None) -> str:
    """Save the model's weights only (e.g. a converted HF checkpoint) as ``SAVE/release``.

    Collective over all ranks of the (initialised) parallel state. ``load_checkpoint`` /
    ``pretrain_longvila.py --load`` reads it as weights (iteration 0, fresh optimizer).
    """
    sd = {"model": _model_sharded_state_dict(model), "format_version": FORMAT_VERSION,
          "layout": current_layout(),
          "iteration": 0 if iteration == RELEASE else int(iteration)}
    if config is None:
        config = getattr(unwrap_model(model), "cfg", None)
    return _save(save_dir, iteration, sd, None, config)


# ------------------------------------------------------------------ load

def read_checkpoint_config(load_dir: str):
    """The LongVILAConfig a checkpoint directory was saved with (or None if absent)."""
    from ..models.config import LongVILAConfig
    path = os.path.join(load_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return LongVILAConfig.from_dict(json.load(f))


def read_common_state(load_dir: str, iteration=None) -> Dict[str, Any]:
    """The small non-tensor part (iteration, args, layout, scheduler) without loading tensors."""
    return dist_checkpointing.load_common_state_dict(checkpoint_dir(load_dir, iteration))


def _load_model_into(model, sd_model):
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
    sd = dist_checkpointing.load({"model": _model_sharded_state_dict(model)}, path,
                                 strict=StrictHandling.RAISE_UNEXPECTED)
    _load_model_into(model, sd["model"])
    return read_tracker(load_dir) if iteration is None else iteration


def load_checkpoint(load_dir: str, model, optimizer=None, scheduler=None, loader=None,
                    finetune: bool = False, load_rng: bool = True,
                    iteration: Union[int, str, None] = None) -> Dict[str, Any]:
    """Load a checkpoint into model (and optimizer, scheduler, loader, RNG unless finetune).

    ``iteration``: that checkpoint of ``load_dir`` instead of the tracker's (``--ckpt-step``).
    Returns ``{"iteration", "args", "consumed", "layout", "finetune", "loaded": [...]}``;
    ``iteration`` is 0 for a finetune / release / weights-only load.
    """
    it = read_tracker(load_dir) if iteration is None else iteration
    path = checkpoint_dir(load_dir, it)
    common = dist_checkpointing.load_common_state_dict(path)
    weights_only = finetune or it == RELEASE or "optimizer" not in _saved_keys(path, common)
    model_sd = _model_sharded_state_dict(model)
    request: Dict[str, Any] = {"model": model_sd}
    if not weights_only and optimizer is not None:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                            metadata=_sharded_metadata())
    sd = dist_checkpointing.load(request, path, strict=StrictHandling.RAISE_UNEXPECTED)
    _load_model_into(model, sd["model"])
    loaded = ["model"]
    out = {"iteration": 0, "args": common.get("args"), "consumed": common.get("consumed"),
           "layout": common.get("layout"), "finetune": weights_only, "loaded": loaded,
           "path": path}
    if weights_only:
        return out
    if optimizer is not None:
        optimizer.load_state_dict(sd["optimizer"])
        loaded.append("optimizer")
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
        loaded.append("opt_param_scheduler")
    out["iteration"] = int(common["iteration"])
    saved_layout, now = common.get("layout") or {}, current_layout()
    rank_state = _read_rank_state(path, saved_layout, now)
    if rank_state is not None:
        if load_rng and saved_layout == now:
            set_rng_state(rank_state["rng"])
            loaded.append("rng")
        if loader is not None and rank_state.get("loader") is not None:
            if saved_layout.get("dp") == now["dp"]:
                loader.load_state_dict(rank_state["loader"])
                loaded.append("loader")
            else:
                raise ValueError(
                    f"{path}: the loader state was saved at data-parallel size "
                    f"{saved_layout.get('dp')}, this run has {now['dp']}; resuming the sample "
                    "stream needs the same data-parallel size (or load with --finetune)")
    return out


def _saved_keys(path: str, common: Dict[str, Any]):
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata
    keys = {k.split(".", 1)[0] for k in load_tensors_metadata(path)}
    return keys | set(common)


def _read_rank_state(path: str, saved_layout: Dict[str, int], now: Dict[str, int]):
    """This rank's saved state; at another layout, that of a rank with the same DP rank."""
    rdir = os.path.join(path, RANK_STATE_DIR)
    if not os.path.isdir(rdir):
        return None
    me = _layout_ranks()
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
