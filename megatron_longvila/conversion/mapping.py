"""Declarative Hugging Face <-> Megatron-Core parameter mappings (full, unsharded tensors).

One table of rules per part of the model, shared by both directions. A rule names the
Megatron parameter, the Hugging Face parameter(s) it is built from, and how:

- ``copy``:    the same tensor;
- ``qkv``:     Megatron's fused QKV, laid out per query group as [q heads of the group, k, v]
               (grouped-query attention aware), from HF's separate q/k/v projections;
- ``gate_up``: Megatron's fused SwiGLU fc1 = cat([gate, up]) from HF's gate_proj/up_proj.

Each rule also records the tensor-parallel split axis of the Megatron tensor (0 = column
parallel / vocab, 1 = row parallel, None = replicated), for converters that shard by hand.
Both directions work one rule (a few tensors) at a time, so a converter can stream.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..models.config import LanguageModelConfig, LongVILAConfig, VisionConfig


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: Tuple[str, ...]
    kind: str = "copy"  # copy | qkv | gate_up
    tp_axis: Optional[int] = None


def llm_rules(cfg: LanguageModelConfig, hf_prefix: str = "") -> List[Rule]:
    p = hf_prefix
    rules = [Rule("embedding.word_embeddings.weight", (f"{p}model.embed_tokens.weight",), tp_axis=0)]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"{p}model.layers.{i}."
        a = h + "self_attn."
        rules += [
            Rule(m + "input_layernorm.weight", (h + "input_layernorm.weight",)),
            Rule(m + "self_attention.linear_qkv.weight",
                 (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), "qkv", 0),
            Rule(m + "self_attention.linear_proj.weight", (a + "o_proj.weight",), tp_axis=1),
            Rule(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)),
            Rule(m + "mlp.linear_fc1.weight",
                 (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"), "gate_up", 0),
            Rule(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), tp_axis=1),
        ]
        if cfg.qkv_bias:
            rules.append(Rule(m + "self_attention.linear_qkv.bias",
                              (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), "qkv", 0))
    rules.append(Rule("decoder.final_layernorm.weight", (f"{p}model.norm.weight",)))
    if not cfg.tie_word_embeddings:
        rules.append(Rule("output_layer.weight", (f"{p}lm_head.weight",), tp_axis=0))
    return rules


def vision_rules(cfg: VisionConfig, hf_prefix: str = "") -> List[Rule]:
    p = hf_prefix
    rules = [
        Rule("patch_embedding.weight", (p + "embeddings.patch_embedding.weight",)),
        Rule("patch_embedding.bias", (p + "embeddings.patch_embedding.bias",)),
        Rule("position_embedding.weight", (p + "embeddings.position_embedding.weight",)),
    ]
    for i in range(cfg.num_layers):
        m, h = f"layers.{i}.", f"{p}encoder.layers.{i}."
        a = h + "self_attn."
        for wb in ("weight", "bias"):
            rules += [
                Rule(m + f"input_layernorm.{wb}", (h + f"layer_norm1.{wb}",)),
                Rule(m + f"self_attention.linear_qkv.{wb}",
                     (a + f"q_proj.{wb}", a + f"k_proj.{wb}", a + f"v_proj.{wb}"), "qkv", 0),
                Rule(m + f"self_attention.linear_proj.{wb}", (a + f"out_proj.{wb}",),
                     tp_axis=1 if wb == "weight" else None),
                Rule(m + f"pre_mlp_layernorm.{wb}", (h + f"layer_norm2.{wb}",)),
                Rule(m + f"mlp.linear_fc1.{wb}", (h + f"mlp.fc1.{wb}",), tp_axis=0),
                Rule(m + f"mlp.linear_fc2.{wb}", (h + f"mlp.fc2.{wb}",),
                     tp_axis=1 if wb == "weight" else None),
            ]
    rules += [Rule("post_layernorm.weight", (p + "post_layernorm.weight",)),
              Rule("post_layernorm.bias", (p + "post_layernorm.bias",))]
    return rules


def projector_rules(projector_type: str) -> List[Rule]:
    if projector_type == "linear":
        idx = [None]
    elif projector_type == "mlp2x_gelu":
        idx = [0, 2]
    else:  # mlp_downsample*: 0 is the 2x2 merge, 3 the GELU
        idx = [1, 2, 4]
    rules = []
    for i in idx:
        name = "layers" if i is None else f"layers.{i}"
        for wb in ("weight", "bias"):
            rules.append(Rule(f"{name}.{wb}", (f"{name}.{wb}",)))
    return rules


# ----------------------------------------------------------------------------- transforms
def _qkv_to_mcore(q, k, v, heads, groups):
    per = heads // groups
    rest = q.shape[1:]
    q = q.reshape(groups, per * (q.shape[0] // heads), *rest)
    k = k.reshape(groups, k.shape[0] // groups, *rest)
    v = v.reshape(groups, v.shape[0] // groups, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_to_hf(qkv, heads, groups):
    rest = qkv.shape[1:]
    d = qkv.shape[0] // (heads + 2 * groups)
    per = heads // groups
    x = qkv.reshape(groups, (per + 2) * d, *rest)
    q, k, v = torch.split(x, [per * d, d, d], dim=1)
    return (q.reshape(heads * d, *rest), k.reshape(groups * d, *rest),
            v.reshape(groups * d, *rest))


def to_mcore(rule: Rule, tensors: List[torch.Tensor], heads: int = 0, groups: int = 0):
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "qkv":
        return _qkv_to_mcore(*tensors, heads, groups)
    if rule.kind == "gate_up":
        return torch.cat(tensors, dim=0)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def to_hf(rule: Rule, tensor: torch.Tensor, heads: int = 0, groups: int = 0):
    if rule.kind == "copy":
        return [tensor]
    if rule.kind == "qkv":
        return list(_qkv_to_hf(tensor, heads, groups))
    if rule.kind == "gate_up":
        return list(torch.chunk(tensor, 2, dim=0))
    raise ValueError(f"unknown rule kind {rule.kind!r}")


# ----------------------------------------------------------------------------- whole model
def model_rules(cfg: LongVILAConfig, llm_hf_prefix="", vision_hf_prefix=""):
    """(megatron prefix, part name, rules, heads, groups) for every part of LongVILAModel.

    HF names are those of the in-memory transformers modules (transformers 5 also saves
    ``SiglipVisionModel`` this way); older saved towers prefix ``vision_model.``, which a
    converter passes as ``vision_hf_prefix``.
    """
    return [
        ("language_model.", "llm", llm_rules(cfg.llm, llm_hf_prefix),
         cfg.llm.num_attention_heads, cfg.llm.num_query_groups),
        ("vision_model.", "vision_tower", vision_rules(cfg.vision, vision_hf_prefix),
         cfg.vision.num_attention_heads, cfg.vision.num_attention_heads),
        ("projector.", "mm_projector", projector_rules(cfg.projector_type), 0, 0),
    ]


def hf_to_mcore_iter(cfg: LongVILAConfig, get: Dict[str, Callable[[str], torch.Tensor]],
                     **prefixes) -> Iterator[Tuple[str, torch.Tensor, Rule]]:
    """Yield (megatron name, tensor, rule), one rule at a time.

    ``get[part](hf_name)`` returns the HF tensor of that part ("llm", "vision_tower",
    "mm_projector") and raises ``KeyError`` naming the key if it is missing.
    """
    for mprefix, part, rules, heads, groups in model_rules(cfg, **prefixes):
        for rule in rules:
            tensors = [get[part](name) for name in rule.hf]
            yield mprefix + rule.mcore, to_mcore(rule, tensors, heads, groups), rule


def mcore_to_hf_iter(cfg: LongVILAConfig, get: Callable[[str], torch.Tensor], **prefixes):
    """Yield (part, hf name, tensor) from a full Megatron state dict accessor."""
    for mprefix, part, rules, heads, groups in model_rules(cfg, **prefixes):
        for rule in rules:
            for name, t in zip(rule.hf, to_hf(rule, get(mprefix + rule.mcore), heads, groups)):
                yield part, name, t
