"""Model FLOPs of one LongVILA training step (forward + backward), for MFU.

Convention (as in Megatron's and PaLM's MFU): every matmul counts 2 FLOPs per multiply-add in
the forward pass and twice that in the backward pass (3x forward in total), whatever is
recomputed. Elementwise ops, norms, softmax, biases and the embedding lookup count nothing.

- language model, per token: 2 * (qkv + proj + fc1 + fc2 weights of every layer + lm_head);
  the input embedding is a lookup (0 FLOPs); lm_head counts even when tied to it.
- causal attention of a sub-sequence of length s, per layer: QK^T and PV over the
  s(s+1)/2 attended pairs, 2 FLOPs per multiply-add each: 2 * 2 * s(s+1)/2 * d_head * heads.
  Packed rows count each sub-sequence (padding included) separately.
- vision tower, per frame: only the ``vision_layers_used`` blocks that run
  (vision_select_layer=-2 on 27 blocks -> 26): their weights per patch, plus full
  (non-causal) attention 2 * 2 * P^2 * hidden; the patch-embedding convolution as a matmul
  of (3 * patch^2) x hidden per patch.
- projector, per frame: its Linear layers on the tokens they see.
"""

from typing import Dict, Iterable, Optional


def llm_matmul_params(llm) -> Dict[str, int]:
    """Weights that take part in matmuls per token: decoder layers and lm_head."""
    h, d = llm.hidden_size, llm.kv_channels
    qkv = h * (llm.num_attention_heads + 2 * llm.num_query_groups) * d
    proj = llm.num_attention_heads * d * h
    fc1 = h * 2 * llm.ffn_hidden_size  # SwiGLU: gate and up
    fc2 = llm.ffn_hidden_size * h
    return {"layers": llm.num_layers * (qkv + proj + fc1 + fc2),
            "lm_head": llm.vocab_size * h}


def vision_matmul_params_per_layer(v) -> int:
    c = v.hidden_size
    return 4 * c * c + 2 * c * v.intermediate_size  # qkv + proj + fc1 + fc2


def projector_matmul_flops_fwd(cfg) -> int:
    """Forward FLOPs of the projector for one frame."""
    c, h, P = cfg.vision.hidden_size, cfg.llm.hidden_size, cfg.vision.num_patches
    t = cfg.projector_type
    if t.startswith("mlp_downsample"):
        return 2 * cfg.tokens_per_frame * (4 * c * h + h * h)
    if t == "linear":
        return 2 * P * c * h
    if t == "mlp2x_gelu":
        return 2 * P * (c * h + h * h)
    raise ValueError(t)


def causal_attention_flops_fwd(seq_lens: Iterable[int], heads: int, head_dim: int,
                               layers: int) -> int:
    pairs = sum(int(s) * (int(s) + 1) // 2 for s in seq_lens)
    return 2 * 2 * pairs * head_dim * heads * layers


def backward_multipliers(trainable: Iterable[str]) -> Dict[str, float]:
    """Forward + backward as a multiple of the forward, per part, for the trained parts.

    A trained part: 3x (activation and weight gradients). A frozen part that still passes
    gradients to a trained part before it: 2x (activation gradients only). Otherwise 1x.
    Order of the model: vision tower -> projector -> language model.
    """
    t = set(trainable)
    return {"llm": 3.0 if "llm" in t else (2.0 if t & {"vision", "projector"} else 1.0),
            "projector": 3.0 if "projector" in t else (2.0 if "vision" in t else 1.0),
            "vision": 3.0 if "vision" in t else 1.0}


def step_flops(cfg, seq_lens: Iterable[int], n_frames: int, train_vision: bool = True,
               labelled_tokens: Optional[int] = None,
               trainable: Optional[Iterable[str]] = None) -> Dict[str, float]:
    """Model FLOPs of one training step on a packed row.

    ``seq_lens``: sub-sequence lengths of the row (they sum to its length);
    ``n_frames``: frames the vision tower encodes. With ``train_vision=False`` the tower
    and projector count forward only (no backward runs through them).
    ``labelled_tokens``: positions with a label. The model computes the output layer only
    there (``LongVILAModel._output_losses_on_labelled``), so lm_head work is counted for them
    alone; ``None`` counts every position (a model that computes all logits).
    ``trainable``: the parts that train (``vision``, ``projector``, ``llm``), for the
    backward multipliers of :func:`backward_multipliers`; ``None`` means all of them, or the
    language model and projector only when ``train_vision=False``.
    """
    if trainable is None:
        trainable = ("vision", "projector", "llm") if train_vision else ("projector", "llm")
    mult = backward_multipliers(trainable)
    seq_lens = [int(s) for s in seq_lens]
    S = sum(seq_lens)
    head_tokens = S if labelled_tokens is None else int(labelled_tokens)
    llm, v = cfg.llm, cfg.vision
    mp = llm_matmul_params(llm)
    fwd = {
        "llm_dense": 2 * mp["layers"] * S,
        "lm_head": 2 * mp["lm_head"] * head_tokens,
        "llm_attention": causal_attention_flops_fwd(seq_lens, llm.num_attention_heads,
                                                    llm.kv_channels, llm.num_layers),
    }
    P, n_used = v.num_patches, cfg.vision_layers_used
    vis = {
        "vision_dense": n_frames * n_used * 2 * vision_matmul_params_per_layer(v) * P,
        "vision_attention": n_frames * n_used * 2 * 2 * P * P * v.hidden_size,
        "patch_embed": n_frames * 2 * P * (v.num_channels * v.patch_size ** 2) * v.hidden_size,
        "projector": n_frames * projector_matmul_flops_fwd(cfg),
    }
    out = {k: mult["llm"] * x for k, x in fwd.items()}
    out.update({k: mult["projector" if k == "projector" else "vision"] * x
                for k, x in vis.items()})
    out["total"] = sum(out.values())
    return out
