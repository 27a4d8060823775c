"""Shared helpers for model tests: Megatron state, tiny configs, tiny HF references, batches."""

import torch

from megatron_longvila import launch
from megatron_longvila.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from megatron_longvila.evaluation.hf_reference import HFLongVILA
from megatron_longvila.evaluation.hf_reference import hf_modules as reference_modules
from megatron_longvila.models.config import LanguageModelConfig, LongVILAConfig, VisionConfig


def init_single_process():
    """A one-rank gloo world with Megatron's parallel state (for in-process tests)."""
    from megatron.core import parallel_state
    launch.init_process_group("gloo")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def tiny_config(family="qwen2", projector="mlp_downsample", image_size=28, patch=4, tied=None,
                select=-2):
    """Tiny shapes with an odd 7x7 patch grid (padded to 8x8 by mlp_downsample)."""
    qwen = family == "qwen2"
    llm = LanguageModelConfig(vocab_size=256, hidden_size=64, num_layers=2,
                              num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96,
                              rope_base=10000.0 if qwen else 500000.0,
                              norm_eps=1e-6 if qwen else 1e-5, qkv_bias=qwen,
                              tie_word_embeddings=qwen if tied is None else tied,
                              max_position_embeddings=512, family="qwen2" if qwen else "llama")
    vision = VisionConfig(image_size=image_size, patch_size=patch, hidden_size=32, num_layers=3,
                          num_attention_heads=4, intermediate_size=48)
    return LongVILAConfig(llm=llm, vision=vision, projector_type=projector,
                          vision_select_layer=select)


def hf_modules(cfg: LongVILAConfig, seed=0):
    """Random tiny transformers modules of the same shapes (no download), with random
    non-trivial norms and biases, so the mapping of every tensor is exercised."""
    lm, vt, proj = reference_modules(cfg, "eager", seed=seed)
    with torch.no_grad():
        for m in (lm, vt):
            for n, p in m.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.add_(torch.randn_like(p) * 0.1)
    return lm.eval(), vt.eval(), proj


def hf_reference_logits(cfg, lm, vt, proj, batch):
    """The HF reference (transformers modules, sample by sample, VILA's merge) on a batch."""
    with torch.no_grad():
        return HFLongVILA(cfg, lm, vt, proj)(batch["tokens"], batch["position_ids"],
                                             batch["frames"],
                                             cu_seqlens=batch["cu_seqlens"]).output


def packed_batch(cfg: LongVILAConfig, frames_per_sample=(3, 0, 1), text_lens=(7, 11, 5),
                 pad=3, seed=1):
    """A packed row: several samples (some with frames), document boundaries, padding."""
    g = torch.Generator().manual_seed(seed)
    T = cfg.tokens_per_frame
    tokens, labels, pos, cu, fps = [], [], [], [0], []
    for nf, nt in zip(frames_per_sample, text_lens):
        ids = torch.randint(0, cfg.llm.vocab_size, (nt,), generator=g)
        sample = torch.cat([ids[:2], torch.full((nf * T,), IMAGE_TOKEN_INDEX), ids[2:]])
        lab = torch.cat([sample[1:], torch.tensor([IGNORE_INDEX])])
        lab[lab == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
        lab[: 2 + nf * T] = IGNORE_INDEX
        tokens.append(sample), labels.append(lab), pos.append(torch.arange(len(sample)))
        cu.append(cu[-1] + len(sample)), fps.append(nf)
    if pad:
        tokens.append(torch.zeros(pad, dtype=torch.long))
        labels.append(torch.full((pad,), IGNORE_INDEX))
        pos.append(torch.arange(pad)), cu.append(cu[-1] + pad), fps.append(0)
    n_frames = sum(frames_per_sample)
    frames = torch.randn(n_frames, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return dict(tokens=torch.cat(tokens)[None], labels=torch.cat(labels)[None],
                position_ids=torch.cat(pos)[None], cu_seqlens=torch.tensor(cu, dtype=torch.int32),
                frames=frames, frames_per_sample=torch.tensor(fps))


def hf_state_getters(lm, vt, proj):
    lsd, vsd, psd = lm.state_dict(), vt.state_dict(), proj.state_dict()

    def getter(sd, part):
        def get(name):
            if name not in sd:
                raise KeyError(f"{part}: missing tensor {name}")
            return sd[name]
        return get
    return {"llm": getter(lsd, "llm"), "vision_tower": getter(vsd, "vision_tower"),
            "mm_projector": getter(psd, "mm_projector")}


def full_mcore_state_from_hf(cfg, lm, vt, proj):
    from megatron_longvila.conversion.mapping import hf_to_mcore_iter
    return {name: t.clone() for name, t, _ in hf_to_mcore_iter(cfg, hf_state_getters(lm, vt, proj))}
