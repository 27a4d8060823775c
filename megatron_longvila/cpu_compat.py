"""What Megatron-Core needs to run without CUDA (CPU tests, the CPU demo), in one place.

Megatron-Core assumes a GPU in a few spots that have nothing to do with the model's math.
``enable()`` patches exactly those, and only when CUDA is absent: on a GPU it is a no-op and
nothing in the GPU path changes. Every patch below says why it exists.

The patches are process-wide, so they are switched on once, at the entry points, never by
library code that merely builds a model:
``pretrain_longvila.py``, ``tools/*.py`` that run a model (generate, eval_needle, the
converters, the benchmarks), the process bootstrap :func:`megatron_longvila.launch.init_process_group`
on a gloo world (which also covers every :func:`~megatron_longvila.launch.spawn` rank), and
``tests/conftest.py`` for in-process tests. :func:`model_parallel_seed` on the CPU needs the
RNG-tracker patches and switches them on itself if no entry point did.
"""

import types

import torch

_ENABLED = False


def _cpu_get_rng_state(device="cuda", clone=False, graph_safe=False):
    # Megatron's RNG tracker (used by recompute/activation checkpointing and by the TP
    # dropout fork) saves and restores "the CUDA RNG state". Without CUDA the only generator
    # that drives CPU kernels is the CPU default generator, so that is the state to track.
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_tracker_add(self, name, seed):
    # CudaRNGStatesTracker.add seeds torch.cuda's generator to capture a new state; a CPU
    # generator seeded the same way gives the state to fork to instead.
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    if name in self.states_:
        raise Exception(f"rng state {name} already exists")
    self.seeds_.add(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    self.states_[name] = gen.get_state()


def _cpu_current_device():
    # Megatron allocates communication buffers (TP all-gathers, reduce-scatters, the
    # vocab-parallel embedding/cross entropy) with ``device=torch.cuda.current_device()``.
    # Without CUDA that call raises; the buffers belong on the CPU, where gloo works.
    return torch.device("cpu")


def _cpu_synchronize(device=None):
    # Dist checkpointing's file writer calls torch.cuda.synchronize() before copying tensors
    # to the host. With no device there is no queued work to wait for.
    return None


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    # Megatron's version asserts ``grad.type() == 'torch.cuda.FloatTensor'`` before scaling; the
    # same scaling (by max_norm / (total_norm + 1e-6) when below 1) of CPU fp32 gradients.
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


class _CudaToCpuTorch(types.ModuleType):
    """``torch`` as seen by a Megatron-Core module that builds small bookkeeping tensors with a
    hard-coded ``device="cuda"`` (the optimizer's loss-scale / found-inf tensors, the gradient
    norm in clip_grads, the token counter of the micro-batch schedules). Without CUDA these
    tensors belong on the CPU; every other attribute is plain ``torch``."""

    _FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange")

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, _f=attr, **kwargs):
                dev = kwargs.get("device")
                if dev is not None and torch.device(dev).type == "cuda":
                    kwargs["device"] = "cpu"
                return _f(*args, **kwargs)
            return factory
        return attr


# Megatron-Core modules (training path: optimizer, gradient clipping, schedules, DDP buffers)
# that create tensors with device="cuda" literally.
_CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",  # local_multi_tensor_l2_norm (the grad norm without apex/TE)
)


def _cpu_dist_opt_init(orig):
    # DistributedOptimizer.__init__ sorts parameters into fp16/bf16 and fp32 groups by comparing
    # ``param.type()`` with 'torch.cuda.{Half,BFloat16,Float}Tensor' and raises TypeError for
    # anything else, i.e. for every CPU parameter. The sorting is by dtype only; while the
    # constructor runs, a CPU tensor's type() answers with the CUDA name of its dtype. Nothing
    # else changes: buffers, shards and the reduce-scatter / all-gather run on the CPU over gloo.
    def __init__(self, *args, **kwargs):
        saved = torch.Tensor.type

        def cuda_type(t, dtype=None, non_blocking=False, **kw):
            if dtype is None and not kw and t.device.type == "cpu":
                return saved(t).replace("torch.", "torch.cuda.", 1)
            return saved(t, dtype, non_blocking, **kw)

        torch.Tensor.type = cuda_type
        try:
            orig(self, *args, **kwargs)
        finally:
            torch.Tensor.type = saved
    return __init__


def enable():
    """Install the CPU shims if (and only if) CUDA is not available. Idempotent."""
    global _ENABLED
    if _ENABLED or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random._get_cuda_rng_state = _cpu_get_rng_state
    mpu_random._set_cuda_rng_state = _cpu_set_rng_state
    mpu_random.CudaRNGStatesTracker.add = _cpu_tracker_add
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _cpu_synchronize
    import importlib
    from megatron.core.optimizer import clip_grads as mcore_clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer
    mcore_clip_grads.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    mcore_optimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    DistributedOptimizer.__init__ = _cpu_dist_opt_init(DistributedOptimizer.__init__)
    proxy = _CudaToCpuTorch()
    for name in _CUDA_LITERAL_MODULES:
        importlib.import_module(name).torch = proxy
    _ENABLED = True


def model_parallel_seed(seed: int):
    """Seed every generator the model uses, as Megatron's ``model_parallel_cuda_manual_seed``.

    On CPU: the default generator plus the tensor-parallel tracker states (via the shims).
    """
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    enable()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mpu_random

    tracker = mpu_random.get_cuda_rng_tracker()
    tracker.reset()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker.add(mpu_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mpu_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mpu_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + tp_rank)
