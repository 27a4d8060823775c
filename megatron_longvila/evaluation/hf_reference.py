"""A Hugging Face (VILA layout) checkpoint answering through transformers, for comparison.

``HFLongVILA(hf_dir)`` loads ``llm/`` with ``AutoModelForCausalLM``, ``vision_tower/`` with
``SiglipVisionModel`` and ``mm_projector/`` (VILA's projector has no transformers class: its
``layers.*`` tensors go into this project's ``MultimodalProjector``, the same module VILA
defines). Its ``forward`` has LongVILAModel's inference signature, so ``generation.generate``
and ``generation.answer`` drive it unchanged: the merge is VILA's (each frame's visual tokens
replace its placeholder run in the input embeddings). One process; no sequence parallelism.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..constants import IMAGE_TOKEN_INDEX


class HFLongVILA(nn.Module):
    def __init__(self, hf_dir: str, attn_implementation: str = "eager"):
        super().__init__()
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, SiglipVisionModel

        from ..conversion.hf_io import llm_config_from_hf, vision_config_from_hf
        from ..models.config import LongVILAConfig
        from ..models.projector import MultimodalProjector

        with open(os.path.join(hf_dir, "config.json")) as f:
            top = json.load(f)
        self.lm = AutoModelForCausalLM.from_pretrained(
            os.path.join(hf_dir, "llm"), torch_dtype=torch.float32,
            attn_implementation=attn_implementation).eval()
        self.vt = SiglipVisionModel.from_pretrained(
            os.path.join(hf_dir, "vision_tower"), torch_dtype=torch.float32,
            attn_implementation=attn_implementation).eval()
        with open(os.path.join(hf_dir, "mm_projector", "config.json")) as f:
            ptype = json.load(f)["mm_projector_type"]
        self.cfg = LongVILAConfig(
            llm=llm_config_from_hf(self.lm.config.to_dict()),
            vision=vision_config_from_hf(self.vt.config.to_dict()), projector_type=ptype,
            vision_select_layer=int(top.get("mm_vision_select_layer", -2)))
        self.proj = MultimodalProjector(ptype, self.cfg.vision.hidden_size,
                                        self.cfg.llm.hidden_size)
        sd = load_file(os.path.join(hf_dir, "mm_projector", "model.safetensors"))
        self.proj.load_state_dict({k: v.float() for k, v in sd.items()})
        self.proj.eval()

    @property
    def tokens_per_frame(self) -> int:
        return self.cfg.tokens_per_frame

    @torch.no_grad()
    def forward(self, tokens, position_ids, frames=None, labels=None, cu_seqlens=None,
                parallel_output=False):
        if tokens.shape[0] != 1 or cu_seqlens is not None or labels is not None:
            raise ValueError("HFLongVILA: one unpacked row, logits only")
        ids = tokens[0]
        vis = ids == IMAGE_TOKEN_INDEX
        emb = self.lm.get_input_embeddings()(ids.masked_fill(vis, 0))
        if frames is not None and frames.shape[0]:
            hs = self.vt(pixel_values=frames, output_hidden_states=True).hidden_states
            visual = self.proj(hs[self.cfg.vision_select_layer]).reshape(-1, emb.shape[-1])
            if int(vis.sum()) != visual.shape[0]:
                raise ValueError(f"{int(vis.sum())} placeholders for {visual.shape[0]} visual tokens")
            emb = emb.clone()
            emb[vis] = visual.to(emb.dtype)
        return self.lm(inputs_embeds=emb[None], position_ids=position_ids).logits
