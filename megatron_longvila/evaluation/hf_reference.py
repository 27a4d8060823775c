"""The Hugging Face reference of LongVILA: transformers' language model and SigLIP tower, the
VILA projector, VILA's merge of visual tokens. The one copy, used by the tests (HF parity),
the converters' checks, the benchmarks (HF baseline) and evaluation (``--hf``).

* :func:`hf_modules` - random transformers modules of a :class:`LongVILAConfig`'s shapes, built
  from the config mapping of :mod:`megatron_longvila.conversion.hf_io` (``hf_llm_config``,
  ``hf_vision_config``: the same mapping the converters write).
* :class:`HFLongVILA` - those modules (or a VILA-layout checkpoint, ``from_pretrained``: ``llm/``
  through ``AutoModelForCausalLM``, ``vision_tower/`` through ``SiglipVisionModel``,
  ``mm_projector/`` into this project's ``MultimodalProjector``, the module VILA defines and
  transformers has no class for) answering with ``LongVILAModel``'s signature and return
  contract (:class:`~megatron_longvila.models.longvila.LongVILAOutput`), so generation,
  evaluation and the tests drive either unchanged. One process; no sequence parallelism.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, SiglipVisionModel

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..conversion.hf_io import (hf_llm_config, hf_vision_config, llm_config_from_hf,
                                vision_config_from_hf)
from ..models.config import LongVILAConfig
from ..models.longvila import LongVILAOutput
from ..models.projector import MultimodalProjector


def hf_modules(cfg: LongVILAConfig, attn_implementation: str = "eager",
               vision_attn_implementation: Optional[str] = None, dtype=torch.float32,
               device="cpu", seed: Optional[int] = None, **llm_config_overrides):
    """Random transformers modules ``(lm, vision_tower, projector)`` of ``cfg``'s shapes (the
    whole SigLIP tower, so weights map 1:1 onto ``LongVILAModel``; no download).

    ``llm_config_overrides`` set attributes of the language model's config (e.g.
    ``use_cache=False``). ``seed`` seeds torch before the modules are built (lm first).
    """
    lcfg = hf_llm_config(cfg.llm, torch.float32)
    for k, v in llm_config_overrides.items():
        setattr(lcfg, k, v)
    vcfg = hf_vision_config(cfg.vision, torch.float32)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(lcfg, attn_implementation=attn_implementation)
        vt = SiglipVisionModel._from_config(
            vcfg, attn_implementation=vision_attn_implementation or attn_implementation)
        proj = MultimodalProjector(cfg.projector_type, cfg.vision.hidden_size,
                                   cfg.llm.hidden_size, cfg.projector_token_order)
    return lm.to(dtype), vt.to(dtype), proj.to(dtype)


class HFLongVILA(nn.Module):
    """SigLIP (hidden state of the selected layer) -> projector -> transformers causal LM.

    ``truncate_vision``: drop the SigLIP blocks after the selected layer (they never change the
    output; the benchmarks' baseline should not time them). Mutates ``vt``.
    """

    def __init__(self, cfg: LongVILAConfig, lm: nn.Module, vt: nn.Module, proj: nn.Module,
                 truncate_vision: bool = False):
        super().__init__()
        self.cfg, self.lm, self.vt, self.proj = cfg, lm, vt, proj
        if truncate_vision:
            enc = getattr(vt, "vision_model", vt).encoder  # transformers 5.x moved it around
            enc.layers = enc.layers[: cfg.vision_layers_used]

    @classmethod
    def from_pretrained(cls, hf_dir: str, attn_implementation: str = "eager") -> "HFLongVILA":
        """A VILA-layout Hugging Face checkpoint directory, in float32, in eval mode."""
        with open(os.path.join(hf_dir, "config.json")) as f:
            top = json.load(f)
        lm = AutoModelForCausalLM.from_pretrained(
            os.path.join(hf_dir, "llm"), torch_dtype=torch.float32,
            attn_implementation=attn_implementation).eval()
        vt = SiglipVisionModel.from_pretrained(
            os.path.join(hf_dir, "vision_tower"), torch_dtype=torch.float32,
            attn_implementation=attn_implementation).eval()
        with open(os.path.join(hf_dir, "mm_projector", "config.json")) as f:
            pconf = json.load(f)
        ptype = pconf["mm_projector_type"]
        cfg = LongVILAConfig(
            llm=llm_config_from_hf(lm.config.to_dict()),
            vision=vision_config_from_hf(vt.config.to_dict()), projector_type=ptype,
            vision_select_layer=int(top.get("mm_vision_select_layer", -2)),
            projector_token_order=pconf.get("token_order"))
        proj = MultimodalProjector(ptype, cfg.vision.hidden_size, cfg.llm.hidden_size,
                                   cfg.projector_token_order)
        sd = load_file(os.path.join(hf_dir, "mm_projector", "model.safetensors"))
        proj.load_state_dict({k: v.float() for k, v in sd.items()})
        return cls(cfg, lm, vt, proj.eval()).eval()

    @property
    def tokens_per_frame(self) -> int:
        return self.cfg.tokens_per_frame

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """``[F, 3, H, W] -> [F, tokens_per_frame, llm_hidden]`` (SigLIP's hidden state after
        the selected layer, then the projector)."""
        hs = self.vt(pixel_values=frames, output_hidden_states=True).hidden_states
        return self.proj(hs[self.cfg.vision_layers_used])

    def embed(self, ids: torch.Tensor, frames: Optional[torch.Tensor]) -> torch.Tensor:
        """VILA's merge: ``ids [S]`` -> ``[S, h]`` with each frame's visual tokens in its
        placeholder run (placeholders in frame order)."""
        vis = ids == IMAGE_TOKEN_INDEX
        emb = self.lm.get_input_embeddings()(ids.masked_fill(vis, 0))
        n_visual = 0
        if frames is not None and frames.shape[0]:
            visual = self.encode_frames(frames).flatten(0, 1)
            n_visual = visual.shape[0]
        if int(vis.sum()) != n_visual:
            raise ValueError(f"the tokens hold {int(vis.sum())} visual placeholder positions but "
                             f"the frames give {n_visual} visual tokens "
                             f"({self.tokens_per_frame} per frame)")
        if n_visual:
            emb = emb.masked_scatter(vis[:, None], visual.to(emb.dtype))
        return emb

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor,
                frames: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None,
                frames_per_sample: Optional[torch.Tensor] = None, parallel_output: bool = False,
                output_rows: Optional[torch.Tensor] = None, per_sample: bool = True
                ) -> LongVILAOutput:
        """One row ``tokens [1, S]``; logits ``[1, S, V]`` or, with labels (next-token ids,
        ``IGNORE_INDEX`` where none), per-token fp32 losses ``[1, S]``.

        Packed rows (``cu_seqlens``): with ``per_sample`` each sub-sequence runs on its own
        (exact document masking in any attention implementation); otherwise the whole row
        runs in one call with its restarting ``position_ids`` and the LM's attention
        implementation must keep the documents apart. ``output_rows``: only those positions'
        outputs (as ``LongVILAModel``).
        """
        if tokens.shape[0] != 1:
            raise ValueError(f"HFLongVILA takes one row: tokens [1, S], got {tuple(tokens.shape)}")
        S = tokens.shape[1]
        emb = self.embed(tokens[0], frames)
        bounds = [0, S]
        if cu_seqlens is not None and per_sample:
            bounds = [int(x) for x in cu_seqlens.tolist()]
        logits = torch.cat([
            self.lm(inputs_embeds=emb[None, s:e], position_ids=position_ids[:, s:e]).logits[0]
            for s, e in zip(bounds[:-1], bounds[1:]) if e > s])
        rows = torch.arange(S, device=tokens.device)[None]
        if output_rows is not None:
            keep = torch.as_tensor(output_rows, device=tokens.device).reshape(-1)
            rows, logits = rows[:, keep], logits[keep]
            labels = None if labels is None else labels[:, keep]
        if labels is None:
            return LongVILAOutput(logits[None], None, rows)
        valid = labels[0] != IGNORE_INDEX
        losses = F.cross_entropy(logits.float(), labels[0].masked_fill(~valid, 0),
                                 reduction="none") * valid
        return LongVILAOutput(losses[None], valid[None], rows)
