"""Generation for LongVILAModel: prompts built like training samples, frames loaded like
preprocessing, greedy or sampled decoding.

Decoding has no KV cache: every new token re-runs the full forward over the prompt and the
tokens generated so far. At tiny scale this costs little, and it makes the long prefill and
every decoding step take exactly the training path, including MM-SP: with a context-parallel
(SP) group of several ranks, each rank encodes its share of the frames and holds its share of
the tokens (``LongVILAModel.forward`` at SP > 1); only the last position's logits are brought
to every rank (``prefill_logits``: one all-reduce of ``[V]`` over the SP group). All ranks of the group then pick
the same token (greedy, or sampling from an identically seeded generator).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
from megatron.core import parallel_state

from ..constants import IMAGE_TOKEN_INDEX
from ..data.preprocess import encode_frame
from ..data.task_encoder import TaskEncoder, decode_frame_uint8, normalize_frames
from ..data.video import decode_video, is_image_path, load_image, resize_frame
from ..parallel.sharding import select_rows

# --------------------------------------------------------------------------- prompts


def build_prompt_ids(tokenizer, question: str, num_frames: int,
                     history: Optional[Sequence[dict]] = None) -> List[int]:
    """Token ids (one IMAGE_TOKEN_INDEX per frame) of a user turn holding ``num_frames``
    frames and ``question``, up to and including the assistant header: built by the training
    task encoder from a conversation with an empty answer, cut where the answer would start,
    so the ids equal those of a training sample with the same question.

    A question without a ``<video>``/``<image>`` marker gets the frames in front of it, as in
    training. ``history``: earlier turns (``[{"from": "human"|"gpt", "value": ...}, ...]``).
    """
    convs = [dict(t) for t in (history or [])]
    convs += [{"from": "human", "value": question}, {"from": "gpt", "value": ""}]
    ids, targets = TaskEncoder(tokenizer).encode_conversation(convs, num_frames)
    # the empty answer's first target is the end-of-turn token: the prompt stops before it
    last_answer = max(i for i, t in enumerate(targets) if t and (i == 0 or not targets[i - 1]))
    return ids[:last_answer]


def expand_image_tokens(ids: Sequence[int], tokens_per_frame: int) -> torch.Tensor:
    """One placeholder per frame -> ``tokens_per_frame`` placeholders per frame (``[1, S]``)."""
    a = np.asarray(list(ids), dtype=np.int64)
    a = np.repeat(a, np.where(a == IMAGE_TOKEN_INDEX, tokens_per_frame, 1))
    return torch.from_numpy(a)[None]


def stop_token_ids(tokenizer) -> List[int]:
    ids = {int(tokenizer.eos_id)}
    end = tokenizer.encode_template(tokenizer.template.assistant_end)
    if len(end) == 1:
        ids.add(int(end[0]))
    return sorted(ids)


def decode_text(tokenizer, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if getattr(tokenizer, "hf", None) is not None:
        return tokenizer.hf.decode(ids, skip_special_tokens=True)
    raise ValueError(f"tokenizer {tokenizer!r} cannot decode ids (no transformers tokenizer)")


# --------------------------------------------------------------------------- frames


def prepare_frames(frames_u8: Sequence[np.ndarray], image_size: int, resize_mode: str = "crop",
                   image_format: str = "jpg", jpeg_quality: int = 95) -> torch.Tensor:
    """RGB uint8 ``[H, W, 3]`` frames -> model input ``[F, 3, S, S]`` float32, through the
    same steps as preprocessing + the loader: resize, encode (JPEG/PNG), decode, SigLIP
    normalisation. ``image_format=None`` skips the encode/decode round trip."""
    out = []
    for f in frames_u8:
        f = resize_frame(np.asarray(f, dtype=np.uint8), image_size, resize_mode)
        if image_format:
            f = decode_frame_uint8(encode_frame(f, image_format, jpeg_quality), image_size)
        out.append(f)
    if not out:
        return torch.zeros((0, 3, image_size, image_size), dtype=torch.float32)
    u8 = torch.from_numpy(np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2)))
    return normalize_frames(u8)


def read_media(path: str, num_frames: Optional[int] = None) -> List[np.ndarray]:
    """A video (``num_frames`` uniformly sampled, first and last included) or an image
    (one frame) as RGB uint8 arrays."""
    if is_image_path(path):
        return [load_image(path)]
    return decode_video(path, num_frames=num_frames or 8).frames


def load_media(paths: Sequence[str], num_frames: Optional[int], image_size: int, **kw) -> torch.Tensor:
    """Frames of several videos/images, in order, ready for the model."""
    frames: List[np.ndarray] = []
    for p in paths:
        frames.extend(read_media(p, num_frames))
    return prepare_frames(frames, image_size, **kw)


# --------------------------------------------------------------------------- decoding


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: List[int] = field(default_factory=list)


def sp_group():
    """The sequence-parallel (context-parallel) group when it has several ranks, else None."""
    if not parallel_state.model_parallel_is_initialized() or \
            parallel_state.get_context_parallel_world_size() == 1:
        return None
    return parallel_state.get_context_parallel_group()


@torch.no_grad()
def prefill_logits(model, tokens: torch.Tensor, position_ids: torch.Tensor,
                   frames: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                   positions=None) -> torch.Tensor:
    """Long prefill under the model's parallel layout; full-vocabulary logits ``[n, V]`` at
    ``positions`` (indices into the row; default: every token), on every rank.

    At SP > 1 the row is sharded exactly as in training (frames split, 2D attention); each
    rank fills the rows it owns and one all-reduce over the SP group assembles them, so only
    the asked-for rows travel (e.g. the last prompt token of a needle question).
    """
    dev = next(model.parameters()).device  # inputs are built on the host; the model may not be
    tokens, position_ids = tokens.to(dev), position_ids.to(dev)
    frames = None if frames is None else frames.to(dev)
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.to(dev)
    out = model(tokens, position_ids, frames, cu_seqlens=cu_seqlens, parallel_output=False)
    pos = torch.arange(tokens.shape[1]) if positions is None else positions
    return select_rows(out.output[0], out.row_index[0], pos, sp_group())


@torch.no_grad()
def last_token_logits(model, tokens: torch.Tensor, frames: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 logits ``[V]`` of the last position of ``tokens [1, S]`` (full vocabulary, on every
    rank). At SP > 1 the forward is MM-SP-sharded and only the last row travels."""
    S = tokens.shape[1]
    position_ids = torch.arange(S, dtype=torch.long, device=tokens.device)[None]
    # on the host: token picking (sampling with a CPU generator) is the same on every device
    return prefill_logits(model, tokens, position_ids, frames, positions=[S - 1])[0].float().cpu()


def _pick(logits: torch.Tensor, cfg: GenerationConfig, gen: Optional[torch.Generator]) -> int:
    if not cfg.do_sample:
        return int(torch.argmax(logits))
    x = logits / max(cfg.temperature, 1e-6)
    if cfg.top_k and cfg.top_k < x.numel():
        kth = torch.topk(x, cfg.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if cfg.top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < cfg.top_p  # smallest set reaching top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[si[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.no_grad()
def generate(model, prompt: torch.Tensor, frames: Optional[torch.Tensor],
             cfg: GenerationConfig) -> List[int]:
    """New token ids after ``prompt [1, S]`` (placeholders already expanded), stop token
    excluded. Every rank of the model-parallel group must call it with the same inputs."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed) if cfg.do_sample else None
    tokens = prompt
    out: List[int] = []
    try:
        for _ in range(cfg.max_new_tokens):
            nxt = _pick(last_token_logits(model, tokens, frames), cfg, gen)
            if nxt in cfg.stop_ids:
                break
            out.append(nxt)
            tokens = torch.cat([tokens, torch.tensor([[nxt]], dtype=tokens.dtype)], dim=1)
    finally:
        model.train(was_training)
    return out


def answer(model, tokenizer, question: str, frames: Optional[torch.Tensor],
           cfg: Optional[GenerationConfig] = None) -> str:
    """Question + frames -> the model's answer text (prompt built as in training)."""
    cfg = cfg or GenerationConfig()
    if not cfg.stop_ids:
        cfg = GenerationConfig(**{**cfg.__dict__, "stop_ids": stop_token_ids(tokenizer)})
    n = 0 if frames is None else int(frames.shape[0])
    ids = build_prompt_ids(tokenizer, question, n)
    prompt = expand_image_tokens(ids, model.tokens_per_frame)
    return decode_text(tokenizer, generate(model, prompt, frames, cfg))
