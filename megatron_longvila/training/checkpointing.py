"""Training checkpoints: what the trainer adds to the checkpoint format of
:mod:`megatron_longvila.checkpoint` (optimizer, scheduler, RNG states, loader position).

Each rank's RNG states and data-loader state go into the checkpoint's per-rank JSON state.
The distributed optimizer's state is saved in Megatron-Core's dp_reshardable (default) or
fully_reshardable format (see ``checkpoint.OPTIM_SHARDING_TYPES``), with the workarounds its
0.16 load needs with torch's Adam (below). RNG
states load only at the same layout; the loader state only at the same data-parallel size.
Public: :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`get_rng_state`,
:func:`set_rng_state`; everything else is the checkpoint package's.
"""

import base64
import contextlib
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


# ------------------------------------------------------------------ distributed optimizer

def _distributed_optimizers(optimizer):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inner if isinstance(o, DistributedOptimizer)]


def _optimizer_metadata(optimizer, optim_sharding: str) -> Dict[str, Any]:
    """The sharded-state metadata for ``optimizer``. A plain (non-distributed) optimizer's state
    is in model space whatever the format key says; the key only decides whether a
    ChainedOptimizer prefixes its sub-optimizers' keys, so it keeps the model-space value its
    checkpoints were always saved with."""
    if not _distributed_optimizers(optimizer):
        optim_sharding = "fully_reshardable"
    return ckpt.sharded_metadata(optim_sharding)


def _saved_optimizer_sharding(common: Dict[str, Any]) -> Optional[str]:
    """The distributed-optimizer format of a checkpoint (None: a plain optimizer's state)."""
    opt = common.get("optimizer")
    if isinstance(opt, dict):
        if "param_state_sharding_type" in opt:
            return opt["param_state_sharding_type"]
        for v in opt.values():  # a chained optimizer's sub-states
            if isinstance(v, dict) and "param_state_sharding_type" in v:
                return v["param_state_sharding_type"]
    return None


def _check_optimizer_loadable(path: str, optimizer, saved_sharding: Optional[str],
                              saved_layout: Dict[str, int]):
    """A one-line error for an optimizer state this run cannot take (before any tensor I/O)."""
    distributed = bool(_distributed_optimizers(optimizer))
    if distributed and saved_sharding is None:
        raise ValueError(f"{path}: the optimizer state was saved without "
                         "--use-distributed-optimizer; this run uses it (load with "
                         "--no-load-optim to keep only the weights)")
    if not distributed and saved_sharding is not None:
        raise ValueError(f"{path}: the optimizer state was saved by the distributed optimizer "
                         f"({saved_sharding}); this run needs --use-distributed-optimizer (or "
                         "--no-load-optim to keep only the weights)")
    if saved_sharding is not None and saved_sharding not in ckpt.OPTIM_SHARDING_TYPES:
        raise ValueError(f"{path}: distributed optimizer state in format {saved_sharding!r}; "
                         f"this version reads {', '.join(ckpt.OPTIM_SHARDING_TYPES)}")
    now = ckpt.current_layout()
    if saved_sharding == "dp_reshardable" and any(
            saved_layout.get(k, now[k]) != now[k] for k in ("tp", "pp")):
        raise ValueError(
            f"{path}: the distributed optimizer state was saved as dp_reshardable at "
            f"TP={saved_layout.get('tp')} PP={saved_layout.get('pp')}; this run has "
            f"TP={now['tp']} PP={now['pp']}, and that format reshards only over data/sequence "
            "parallel ranks (save with --dist-ckpt-optim-fully-reshardable to change TP, or "
            "load with --no-load-optim)")


def _prepare_distributed_optimizer_for_load(optimizer):
    """Megatron-Core's DistributedOptimizer.sharded_state_dict(is_loading=True) first reads its
    own state_dict(), which with torch's Adam (no TE/apex) requires an allocated state with a
    'step'; a fresh optimizer (no step taken yet) has none. Allocate zero state: the load
    overwrites every tensor of it and the step (from the saved param groups)."""
    for o in _distributed_optimizers(optimizer):
        if len(o.optimizer.state) == 0:
            for group in o.optimizer.param_groups:
                for p in group["params"]:
                    o.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                            "exp_avg": torch.zeros_like(p),
                                            "exp_avg_sq": torch.zeros_like(p)}


@contextlib.contextmanager
def _tolerate_missing_step(optimizer):
    """Megatron-Core 0.16's fully_reshardable load hands DistributedOptimizer.
    _set_main_param_and_optimizer_states the loaded tensors without torch Adam's 'step' (it
    skips it on purpose) while that method copies every key of the current state, 'step'
    included: a KeyError. For the duration of the load a missing key keeps its current value
    (the step is then set by _restore_distributed_optimizer_steps)."""
    patched = []
    for o in _distributed_optimizers(optimizer):
        orig = o._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _o=o, _orig=orig):
            cur = _o._get_main_param_and_optimizer_states(model_param)
            missing = {k: v for k, v in cur.items() if k not in tensors}
            _orig(model_param, {**missing, **tensors} if missing else tensors)

        o._set_main_param_and_optimizer_states = set_states
        patched.append(o)
    try:
        yield
    finally:
        for o in patched:
            del o._set_main_param_and_optimizer_states  # back to the class's method


def _restore_distributed_optimizer_steps(optimizer, loaded):
    """Adam's step count after a distributed-optimizer load, as it was saved.

    With torch's Adam (no TE/apex, as on the CPU and on a GPU without them) Megatron-Core 0.16's
    DistributedOptimizer.load_state_dict sets every parameter's 'step' to the saved count, but
    then copies the per-parameter state of the request over it, where 'step' is a
    non-persistent local value (the count before the load), and leaves one 'step' tensor
    shared by all parameters (which torch's foreach Adam then increments once per parameter).
    Give every parameter its own step tensor holding the saved count."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [loaded] if len(chained) == 1 else [v for _, v in sorted(loaded.items())]
    for o, part in zip(chained, parts):
        if not isinstance(o, DistributedOptimizer) or not isinstance(part, dict):
            continue
        groups = (part.get("optimizer") or {}).get("param_groups") or []
        steps = {g["step"] for g in groups if g.get("step") is not None}
        if len(steps) != 1:
            continue  # TE/apex FusedAdam: the step lives in the param groups, nothing to fix
        step = float(steps.pop())
        for st in o.optimizer.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = torch.full_like(st["step"], step)


# ------------------------------------------------------------------ save

def save_checkpoint(save_dir: str, iteration: int, model, optimizer=None, scheduler=None,
                    loader=None, args: Optional[dict] = None, config=None,
                    consumed: Optional[dict] = None, keep_last: Optional[int] = None,
                    before_commit: Optional[Callable[[str], None]] = None,
                    optim_sharding: str = "dp_reshardable") -> str:
    """Save a training checkpoint (collective: every rank calls it). Returns its directory.

    ``before_commit``: see :func:`megatron_longvila.checkpoint.save_sharded`.
    ``optim_sharding``: the distributed optimizer's format (``ckpt.OPTIM_SHARDING_TYPES``)."""
    model_sd = ckpt.model_sharded_state_dict(model)
    sd: Dict[str, Any] = dict(ckpt.model_common_state(iteration, ckpt.current_layout()),
                              model=model_sd)
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=False, metadata=_optimizer_metadata(optimizer, optim_sharding))
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
        saved_sharding = _saved_optimizer_sharding(common)
        _check_optimizer_loadable(path, optimizer, saved_sharding, common.get("layout") or {})
        _prepare_distributed_optimizer_for_load(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=True,
            metadata=_optimizer_metadata(optimizer, saved_sharding or "dp_reshardable"))
    sd = ckpt.load_sharded(request, path)
    ckpt.load_model_into(model, sd["model"])
    loaded = ["model"]
    out = {"iteration": 0, "args": common.get("args"), "consumed": common.get("consumed"),
           "layout": common.get("layout"), "finetune": weights_only, "loaded": loaded,
           "path": path}
    if weights_only:
        return out
    if optimizer is not None:
        with torch.no_grad(), _tolerate_missing_step(optimizer):
            # no_grad: fp32 main params are views of the (leaf) model params
            optimizer.load_state_dict(sd["optimizer"])
        _restore_distributed_optimizer_steps(optimizer, sd["optimizer"])
        loaded.append("optimizer")
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
        loaded.append("opt_param_scheduler")
    out["iteration"] = int(common["iteration"])
    saved_layout, now = common.get("layout") or {}, ckpt.current_layout()
    rank_state = ckpt.read_rank_state(path, saved_layout, now)
    if rank_state is None and (loader is not None or (load_rng and saved_layout == now)):
        raise ckpt.CheckpointError(
            f"{path}: no per-rank state (RNG states and loader position) for this rank in "
            f"{ckpt.RANK_STATE_DIR}/: resuming would replay samples; load the weights only "
            "with --finetune, or pass --no-load-rng --no-load-loader-state")
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
