"""Training checkpoints: what the trainer adds to the checkpoint format of
:mod:`megatron_longvila.checkpoint` (optimizer, scheduler, RNG states, loader position).

Each rank's RNG states and data-loader state go into the checkpoint's per-rank JSON state. RNG
states load only at the same layout; the loader state only at the same data-parallel size.
Public: :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`get_rng_state`,
:func:`set_rng_state`; everything else is the checkpoint package's.
"""

import base64
import json
import random
from typing import Any, Callable, Dict, Optional, Union

import numpy as np
import torch
from megatron.core import tensor_parallel

from .. import checkpoint as ckpt


# ------------------------------------------------------------------ RNG state (JSON-able)

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def get_rng_state() -> Dict[str, Any]:
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

def save_checkpoint(save_dir: str, iteration: int, model, optimizer=None, scheduler=None,
                    loader=None, args: Optional[dict] = None, config=None,
                    consumed: Optional[dict] = None, keep_last: Optional[int] = None,
                    before_commit: Optional[Callable[[str], None]] = None) -> str:
    """Save a training checkpoint (collective: every rank calls it). Returns its directory.

    ``before_commit``: see :func:`megatron_longvila.checkpoint.save_sharded`."""
    model_sd = ckpt.model_sharded_state_dict(model)
    sd: Dict[str, Any] = dict(ckpt.model_common_state(iteration, ckpt.current_layout()),
                              model=model_sd)
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=False,
                                                       metadata=ckpt.sharded_metadata())
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if args is not None:
        sd["args"] = json.loads(json.dumps(args, default=str))
    if consumed is not None:
        sd["consumed"] = dict(consumed)
    rank_state = dict(ckpt.layout_ranks(), layout=ckpt.current_layout(), rng=get_rng_state(),
                      loader=loader.state_dict() if loader is not None else None)
    if config is None:
        config = getattr(ckpt.unwrap_model(model), "cfg", None)
    return ckpt.save_sharded(save_dir, iteration, sd, rank_state, config, keep_last,
                             before_commit=before_commit)


# ------------------------------------------------------------------ load

def load_checkpoint(load_dir: str, model, optimizer=None, scheduler=None, loader=None,
                    finetune: bool = False, load_rng: bool = True,
                    iteration: Union[int, str, None] = None) -> Dict[str, Any]:
    """Load a checkpoint into model (and optimizer, scheduler, loader, RNG unless finetune).

    ``iteration``: that checkpoint of ``load_dir`` instead of the tracker's (``--ckpt-step``).
    Returns ``{"iteration", "args", "consumed", "layout", "finetune", "loaded": [...]}``;
    ``iteration`` is 0 for a finetune / release / weights-only load.
    """
    it = ckpt.read_tracker(load_dir) if iteration is None else iteration
    path = ckpt.checkpoint_dir(load_dir, it)
    common = ckpt.read_common_state(load_dir, it)
    weights_only = (finetune or it == ckpt.RELEASE
                    or "optimizer" not in ckpt.saved_keys(path, common))
    model_sd = ckpt.model_sharded_state_dict(model)
    request: Dict[str, Any] = {"model": model_sd}
    if not weights_only and optimizer is not None:
        request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                            metadata=ckpt.sharded_metadata())
    sd = ckpt.load_sharded(request, path)
    ckpt.load_model_into(model, sd["model"])
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
    saved_layout, now = common.get("layout") or {}, ckpt.current_layout()
    rank_state = ckpt.read_rank_state(path, saved_layout, now)
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
