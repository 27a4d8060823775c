"""V-NIAH with the model: the haystack encoded once per frame count, one prefill per cell.

As LongVA / LongVILA evaluate it: the haystack's frame embeddings (vision tower + projector)
are computed once per frame count (each SP rank encodes its balanced share of the frames,
then they are gathered), the needle's once per needle; a cell splices the needle's embedding
in at its depth and runs ONE prefill (sharded over the SP group, KV cache filled), from which
come both scores: free generation (decoded against the cache) and teacher-forced (the cache
rewound, the answer's tokens fed; correct when every answer token is the argmax before it).
A model without a KV cache or ``visual_embeddings`` (the Hugging Face reference) gets the
frames and the recompute path instead.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..parallel.layout import split_frames
from . import generation as G
from .needle import Needle, insert_needle, needle_index

SCORES = ("both", "generate", "teacher-forced")


@torch.no_grad()
def encode_frames_sharded(model, frames: torch.Tensor, group=None, chunk: int = 64) -> torch.Tensor:
    """``[F, 3, H, W] -> [F, tokens_per_frame, h]`` on every rank: each rank of ``group``
    encodes its balanced share (``chunk`` frames at a time), then an all-gather."""
    n = frames.shape[0]
    sp = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    a, b = split_frames([1] * n, sp)[rank] if n else (0, 0)
    parts = [model.encode_frames(frames[i:min(i + chunk, b)]) for i in range(a, b, chunk)]
    T, h = model.tokens_per_frame, model.cfg.llm.hidden_size
    p = next(model.parameters())
    local = torch.cat(parts) if parts else p.new_zeros((0, T, h))
    if sp == 1:
        return local
    ranges = split_frames([1] * n, sp)
    m = max(e - s for s, e in ranges)
    buf = local.new_zeros((m, T, h))
    buf[:local.shape[0]] = local
    got = [torch.empty_like(buf) for _ in range(sp)]
    dist.all_gather(got, buf.contiguous(), group=group)
    return torch.cat([g[:e - s] for g, (s, e) in zip(got, ranges)])


class NeedleEvaluator:
    """Answers V-NIAH cells (``cell``) for :func:`~megatron_longvila.evaluation.needle.run_cells`.

    ``score``: ``both`` (free generation + teacher-forced, one prefill), ``generate`` or
    ``teacher-forced``. Call :meth:`set_haystack` when the frame count changes.
    """

    def __init__(self, model, tokenizer, image_size: int, gen_cfg: G.GenerationConfig,
                 score: str = "both", needles: Sequence[Needle] = (),
                 needle_frames: Sequence[np.ndarray] = ()):
        if score not in SCORES:
            raise ValueError(f"score {score!r}: one of {', '.join(SCORES)}")
        self.model, self.tok, self.size, self.cfg, self.score = (model, tokenizer, image_size,
                                                                 gen_cfg, score)
        self.needles, self.needle_frames = list(needles), list(needle_frames)
        self.embed = hasattr(model, "prefill") and hasattr(model, "encode_frames")
        self.frame_count: Optional[int] = None
        self._hay_u8: List[np.ndarray] = []
        self._hay_emb: Optional[torch.Tensor] = None
        self._needle_emb = {}
        self.device = next(model.parameters()).device

    def _encode(self, frames_u8) -> torch.Tensor:
        frames = G.prepare_frames(frames_u8, self.size).to(self.device)
        return encode_frames_sharded(self.model, frames, G.sp_group())

    def set_haystack(self, n_frames: int, haystack_u8: List[np.ndarray]):
        """The ``n_frames - 1`` haystack frames of the cells with ``n_frames`` frames."""
        self.frame_count = n_frames
        self._hay_u8 = list(haystack_u8)
        self._hay_emb = self._encode(self._hay_u8) if self.embed and self._hay_u8 else None

    def _needle(self, i: int) -> torch.Tensor:
        if i not in self._needle_emb:
            self._needle_emb[i] = self._encode([self.needle_frames[i]])
        return self._needle_emb[i]

    def answer_ids(self, answer: str) -> List[int]:
        ids = list(self.tok.encode_text(answer))
        if not ids:
            raise ValueError(f"answer {answer!r} has no tokens")
        return ids

    def cell(self, n: int, depth: float, i: int) -> dict:
        """One needle of one cell: ``{"output": text or None, "teacher_forced": bool or None}``."""
        if n != self.frame_count:
            raise ValueError(f"cell of {n} frames but the haystack is set for {self.frame_count}")
        nd = self.needles[i]
        ids = G.build_prompt_ids(self.tok, nd.question, n)
        prompt = G.expand_image_tokens(ids, self.model.tokens_per_frame).to(self.device)
        answers = [self.answer_ids(nd.answer)]
        kw = {}
        if self.embed:
            at = needle_index(n, depth)
            parts = [] if self._hay_emb is None else [self._hay_emb[:at], self._hay_emb[at:]]
            vis = torch.cat(parts[:1] + [self._needle(i)] + parts[1:]) if parts else self._needle(i)
            kw["visual_embeddings"] = vis.flatten(0, 1)
        else:
            frames = G.prepare_frames(insert_needle(self._hay_u8, self.needle_frames[i], depth),
                                      self.size).to(self.device)
            kw["frames"] = [frames]
        out, tf = None, None
        if self.score == "both" and self.embed:
            gen, correct, _ = G.generate_and_score(self.model, [prompt], answers, self.cfg, **kw)
            out, tf = G.decode_text(self.tok, gen[0]), correct[0]
        else:
            if self.score in ("both", "generate"):
                gen, _ = G.generate_batch(self.model, [prompt], kw.get("frames"), self.cfg,
                                          visual_embeddings=kw.get("visual_embeddings"))
                out = G.decode_text(self.tok, gen[0])
            if self.score in ("both", "teacher-forced"):
                correct, _ = G.teacher_forced(self.model, [prompt], answers, kw.get("frames"),
                                              visual_embeddings=kw.get("visual_embeddings"))
                tf = correct[0]
        return {"output": out, "teacher_forced": tf}
