"""Layer specs and Megatron-Core ``TransformerConfig``s for the language model and the ViT.

Two specs, the same core attention: a local spec (pure torch, runs on the CPU and GPU; what
``auto`` picks) and a Transformer Engine spec, used only when asked for (not yet verified by a
measured run: see ``TE_VERIFIED``). Either way
the ``core_attention`` submodule is :class:`LongVILACoreAttention`, where MM-SP plugs in.
"""

import copy
import functools
import os
import sys

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from .attention import LongVILACoreAttention
from .config import LanguageModelConfig, VisionConfig


def te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


# The Transformer Engine spec is wired (layer_spec) but no run of it has been measured: the GPU
# machine of this project cannot carry transformer-engine's CUDA wheel. Until a run is measured
# (then set this to True and say where in GPU_CHECK.md), "auto" means the local spec, which is
# the one every CPU test and the GPU check run, and an explicit "transformer_engine" warns.
TE_VERIFIED = False
TE_UNVERIFIED_WARNING = (
    "warning: --transformer-impl transformer_engine: this path has not been verified (no "
    "Transformer Engine run of this project has been measured; the CPU tests and the GPU check "
    "run the local spec, --transformer-impl local / auto)")
_warned = False


def resolve_transformer_impl(impl: str) -> str:
    global _warned
    if impl not in ("local", "transformer_engine", "auto"):
        raise ValueError(f"--transformer-impl must be local, transformer_engine or auto, got {impl!r}")
    if impl == "auto":
        return ("transformer_engine" if TE_VERIFIED and te_available() and torch.cuda.is_available()
                else "local")
    if impl == "transformer_engine" and not te_available():
        raise ValueError("--transformer-impl transformer_engine asked for, but transformer_engine "
                         "is not importable (install the gpu extra or use an NGC container)")
    if impl == "transformer_engine" and not TE_VERIFIED and not _warned:
        _warned = True
        if os.environ.get("RANK", "0") == "0":
            print(TE_UNVERIFIED_WARNING, file=sys.stderr, flush=True)
    return impl


def layer_spec(transformer_impl: str, normalization: str, causal: bool):
    if transformer_impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization=normalization)
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention
    attn.params = dict(attn.params or {})
    attn.params["attn_mask_type"] = AttnMaskType.causal if causal else AttnMaskType.no_mask
    attn.submodules.core_attention = LongVILACoreAttention
    return spec


def _common(dtype, tp, sequence_parallel, cp, recompute):
    on_cpu = not torch.cuda.is_available()
    kw = dict(
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Fused kernels are CUDA-only or need apex/TE; the plain torch ops compute the same.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=on_cpu,
        perform_initialization=True,
        init_method_std=0.02,
    )
    if recompute in ("full", "selective"):
        kw["recompute_granularity"] = recompute
        if recompute == "full":
            kw.update(recompute_method="uniform", recompute_num_layers=1)
    elif recompute not in (None, "none"):
        raise ValueError(f"--recompute-granularity must be full or selective, got {recompute!r}")
    return kw


def llm_transformer_config(cfg: LanguageModelConfig, dtype=torch.float32, tp=1,
                           sequence_parallel=False, cp=1, recompute=None) -> TransformerConfig:
    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size, kv_channels=cfg.kv_channels,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        **_common(dtype, tp, sequence_parallel, cp, recompute))


def vision_transformer_config(cfg: VisionConfig, dtype=torch.float32, tp=1,
                              recompute=None) -> TransformerConfig:
    # The ViT runs per frame on the frames this rank encodes; it has no sequence or context
    # parallelism of its own (MM-SP splits its frames instead).
    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size, kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="LayerNorm", layernorm_epsilon=cfg.norm_eps,
        gated_linear_unit=False, activation_func=functools.partial(F.gelu, approximate="tanh"),
        add_bias_linear=True, add_qkv_bias=True,
        **_common(dtype, tp, False, 1, recompute))
