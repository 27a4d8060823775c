"""Generation for LongVILAModel: prompts built like training samples, frames loaded like
preprocessing, greedy or sampled decoding, several prompts per call, V-NIAH scoring.

With the KV cache (``generate_batch``, the default for ``LongVILAModel``): the prompts are
packed into one row (one document each) and prefilled once, taking exactly the training path
including MM-SP (each SP rank encodes its share of the frames and holds its share of the
tokens); the output layer runs only on the prompts' last rows, which one all-reduce brings
to every rank. Each decoding step then feeds one token per unfinished prompt through
``LongVILAModel.decode_step``: the cache stays sharded over the SP group as the prefill left
it and each layer's attention merges the ranks' partial results by log-sum-exp
(:mod:`megatron_longvila.models.kv_cache`). Without it (``use_cache=False``, or a model
without a cache such as the HF reference) every new token re-runs the full forward.
All ranks of the group pick the same token (greedy, or sampling from identically seeded
generators, one per prompt). ``GenerationStats`` reports prefill and decode tokens/s.

``teacher_forced`` scores answers as LongVA / LongVILA score V-NIAH (every answer token the
argmax before it); ``generate_and_score`` does both from one prefill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

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


@dataclass
class GenerationStats:
    """Throughput of one call (times on this rank, after a device sync)."""
    prompts: int = 0
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0   # tokens fed through decode steps (all prompts)
    decode_s: float = 0.0
    generated_tokens: int = 0
    cache_bytes: int = 0     # this rank's KV cache (0 without one)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(prefill_tokens_per_s=self.prefill_tokens_per_s,
                 decode_tokens_per_s=self.decode_tokens_per_s)
        return d


def sp_group():
    """The sequence-parallel (context-parallel) group when it has several ranks, else None."""
    if not parallel_state.model_parallel_is_initialized() or \
            parallel_state.get_context_parallel_world_size() == 1:
        return None
    return parallel_state.get_context_parallel_group()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill_logits(model, tokens: torch.Tensor, position_ids: torch.Tensor,
                   frames: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                   positions=None) -> torch.Tensor:
    """Long prefill under the model's parallel layout; full-vocabulary logits ``[n, V]`` at
    ``positions`` (indices into the row; default: every token), on every rank.

    At SP > 1 the row is sharded exactly as in training (frames split, 2D attention); each
    rank computes the output layer only for the asked-for rows it holds and one all-reduce
    over the SP group assembles them, so only those rows travel (e.g. the last prompt token).
    """
    dev = next(model.parameters()).device  # inputs are built on the host; the model may not be
    tokens, position_ids = tokens.to(dev), position_ids.to(dev)
    frames = None if frames is None else frames.to(dev)
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.to(dev)
    pos = torch.arange(tokens.shape[1]) if positions is None else \
        torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    out = model(tokens, position_ids, frames, cu_seqlens=cu_seqlens, parallel_output=False,
                output_rows=None if positions is None else pos)
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
    x = logits.float().cpu() / max(cfg.temperature, 1e-6)
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


def pack_prompts(prompts: Sequence[torch.Tensor]):
    """Prompts ``[1, S_i]`` -> one packed row: ``tokens [1, S]``, ``position_ids [1, S]``
    (restarting per prompt), ``cu_seqlens [n+1]`` int32."""
    if not prompts:
        raise ValueError("no prompt to generate from")
    lens = [int(p.shape[1]) for p in prompts]
    if min(lens) < 1:
        raise ValueError(f"an empty prompt (prompt lengths {lens})")
    tokens = torch.cat([p.reshape(1, -1) for p in prompts], dim=1)
    pos = torch.cat([torch.arange(n, device=tokens.device) for n in lens])[None]
    cu = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32)
    return tokens, pos, cu


def _cat_frames(frames, n):
    if frames is None:
        return None
    if len(frames) != n:
        raise ValueError(f"{len(frames)} frame sets for {n} prompts")
    have = [f for f in frames if f is not None and f.shape[0] > 0]
    return torch.cat(have) if have else None


def _uses_cache(model, use_cache: Optional[bool]) -> bool:
    can = hasattr(model, "prefill") and hasattr(model, "decode_step")
    if use_cache and not can:
        raise ValueError(f"{type(model).__name__} has no KV cache (prefill/decode_step)")
    return can if use_cache is None else bool(use_cache)


@torch.no_grad()
def generate_batch(model, prompts: Sequence[torch.Tensor],
                   frames: Optional[Sequence[Optional[torch.Tensor]]] = None,
                   cfg: Optional[GenerationConfig] = None, use_cache: Optional[bool] = None,
                   visual_embeddings: Optional[torch.Tensor] = None):
    """Several prompts in one call: ``(new token ids per prompt, GenerationStats)``.

    With the KV cache (default for ``LongVILAModel``) the prompts are packed into one row
    (each its own document) and prefilled once, sharded over the SP group like training;
    then each step feeds one token per unfinished prompt through ``model.decode_step``, the
    cache staying sharded. ``use_cache=False`` is the recompute path: each prompt alone, the
    whole forward re-run per token. ``frames[i]``: prompt i's frames (placeholders already
    expanded in the prompt); or ``visual_embeddings`` (all prompts' visual tokens in order,
    cache path only). Every rank of the model-parallel group calls it with the same inputs.
    """
    cfg = cfg or GenerationConfig()
    was_training = model.training
    model.eval()
    try:
        if _uses_cache(model, use_cache):
            return _generate_cached(model, prompts, frames, cfg, visual_embeddings)
        if visual_embeddings is not None:
            raise ValueError("visual_embeddings need the KV-cache path")
        return _generate_recompute(model, prompts, frames, cfg)
    finally:
        model.train(was_training)


def _generate_recompute(model, prompts, frames, cfg):
    stats = GenerationStats(prompts=len(prompts))
    outs = []
    for i, prompt in enumerate(prompts):
        fr = None if frames is None else frames[i]
        gen = torch.Generator().manual_seed(cfg.seed) if cfg.do_sample else None
        tokens, out = prompt, []
        stats.prompt_tokens += prompt.shape[1]
        for step in range(cfg.max_new_tokens):
            t0 = time.perf_counter()
            logits = last_token_logits(model, tokens, fr)
            _sync(logits.device)
            dt = time.perf_counter() - t0
            if step == 0:
                stats.prefill_s += dt
            else:
                stats.decode_s += dt
                stats.decode_steps += 1
                stats.decode_tokens += 1
            nxt = _pick(logits, cfg, gen)
            if nxt in cfg.stop_ids:
                break
            out.append(nxt)
            tokens = torch.cat([tokens, torch.tensor([[nxt]], dtype=tokens.dtype,
                                                     device=tokens.device)], dim=1)
        stats.generated_tokens += len(out)
        outs.append(out)
    return outs, stats


def _prefill(model, prompts, frames, visual_embeddings, max_new_tokens, stats):
    dev = next(model.parameters()).device  # inputs are built on the host; the model may not be
    tokens, pos, cu = pack_prompts([p.to(dev) for p in prompts])
    last = (cu[1:] - 1).long()
    fr = _cat_frames(frames, len(prompts))
    fr = None if fr is None else fr.to(dev)
    vis = None if visual_embeddings is None else visual_embeddings.to(dev)
    t0 = time.perf_counter()
    out, cache = model.prefill(tokens, pos, cu, frames=fr, visual_embeddings=vis,
                               max_new_tokens=max_new_tokens, output_rows=last)
    logits = select_rows(out.output[0], out.row_index[0], last, sp_group()).float()
    _sync(logits.device)
    stats.prefill_s += time.perf_counter() - t0
    stats.prompts += len(prompts)
    stats.prompt_tokens += int(tokens.shape[1])
    return logits, cache, [int(p.shape[1]) for p in prompts], tokens.device


def _decode(model, cache, feed: Dict[int, int], next_pos: Dict[int, int], device, stats):
    """One step: token ``feed[p]`` at position ``next_pos[p]`` for each prompt p -> fp32
    logits ``[n, V]`` in ``feed``'s order."""
    active = list(feed)
    toks = torch.tensor([[feed[p] for p in active]], dtype=torch.long, device=device)
    pos = torch.tensor([[next_pos[p] for p in active]], dtype=torch.long, device=device)
    t0 = time.perf_counter()
    logits = model.decode_step(toks, pos, cache, active).float()
    _sync(logits.device)
    stats.decode_s += time.perf_counter() - t0
    stats.decode_steps += 1
    stats.decode_tokens += len(active)
    return logits


def _generate_cached(model, prompts, frames, cfg, visual_embeddings):
    stats = GenerationStats()
    if cfg.max_new_tokens < 1:
        return [[] for _ in prompts], stats
    logits, cache, lens, device = _prefill(model, prompts, frames, visual_embeddings,
                                           cfg.max_new_tokens, stats)
    outs = _free_run(model, cache, logits, lens, cfg, device, stats)
    stats.cache_bytes = cache.memory_bytes()
    stats.generated_tokens = sum(len(o) for o in outs)
    return outs, stats


def _free_run(model, cache, logits, lens, cfg, device, stats):
    n = len(lens)
    gens = [torch.Generator().manual_seed(cfg.seed) if cfg.do_sample else None for _ in range(n)]
    outs: List[List[int]] = [[] for _ in range(n)]
    live = list(range(n))
    rows = {p: j for j, p in enumerate(live)}
    while True:
        still = []
        for p in live:
            t = _pick(logits[rows[p]], cfg, gens[p])
            if t in cfg.stop_ids:
                continue
            outs[p].append(t)
            if len(outs[p]) < cfg.max_new_tokens:
                still.append(p)
        if not still:
            return outs
        live = still
        rows = {p: j for j, p in enumerate(live)}
        logits = _decode(model, cache, {p: outs[p][-1] for p in live},
                         {p: lens[p] + len(outs[p]) - 1 for p in live}, device, stats)


@torch.no_grad()
def teacher_forced(model, prompts: Sequence[torch.Tensor], answers: Sequence[Sequence[int]],
                   frames: Optional[Sequence[Optional[torch.Tensor]]] = None,
                   visual_embeddings: Optional[torch.Tensor] = None, use_cache: Optional[bool] = None):
    """V-NIAH scoring as LongVA / LongVILA score it: the answer tokens follow the prompt and a
    prompt is correct when every answer token is the argmax of the logits before it.
    Returns ``(correct per prompt, argmax ids per prompt)``.

    With the KV cache: one prefill of the prompts, then the answers fed token by token through
    ``decode_step``. Without: one forward of prompt + answer per prompt, the logits of the
    answer's rows only.
    """
    if any(len(a) == 0 for a in answers):
        raise ValueError("an empty answer cannot be scored teacher-forced")
    was_training = model.training
    model.eval()
    try:
        if _uses_cache(model, use_cache):
            stats = GenerationStats()
            logits, cache, lens, device = _prefill(model, prompts, frames, visual_embeddings,
                                                   max(len(a) for a in answers), stats)
            return _forced_run(model, cache, logits, lens, answers, device, stats)
        preds = []
        for i, (prompt, ans) in enumerate(zip(prompts, answers)):
            P = prompt.shape[1]
            full = torch.cat([prompt, torch.tensor([list(ans)], dtype=prompt.dtype,
                                                   device=prompt.device)], dim=1)
            pos = torch.arange(full.shape[1], device=full.device)[None]
            lg = prefill_logits(model, full, pos, None if frames is None else frames[i],
                                positions=list(range(P - 1, P + len(ans) - 1)))
            preds.append([int(x) for x in lg.argmax(-1)])
        return [p == [int(a) for a in ans] for p, ans in zip(preds, answers)], preds
    finally:
        model.train(was_training)


def _forced_run(model, cache, logits, lens, answers, device, stats):
    n = len(lens)
    preds: List[List[int]] = [[int(logits[p].argmax())] for p in range(n)]
    for step in range(1, max(len(a) for a in answers)):
        live = [p for p in range(n) if len(answers[p]) > step]
        logits = _decode(model, cache, {p: int(answers[p][step - 1]) for p in live},
                         {p: lens[p] + step - 1 for p in live}, device, stats)
        for j, p in enumerate(live):
            preds[p].append(int(logits[j].argmax()))
    return [p == [int(a) for a in ans] for p, ans in zip(preds, answers)], preds


@torch.no_grad()
def generate_and_score(model, prompts: Sequence[torch.Tensor], answers: Sequence[Sequence[int]],
                       cfg: GenerationConfig,
                       frames: Optional[Sequence[Optional[torch.Tensor]]] = None,
                       visual_embeddings: Optional[torch.Tensor] = None):
    """Free generation and teacher-forced scoring from ONE prefill (KV cache rewound between
    them): ``(new ids per prompt, teacher-forced correct per prompt, GenerationStats)``."""
    was_training = model.training
    model.eval()
    try:
        stats = GenerationStats()
        room = max(cfg.max_new_tokens, max(len(a) for a in answers))
        logits, cache, lens, device = _prefill(model, prompts, frames, visual_embeddings, room,
                                               stats)
        outs = _free_run(model, cache, logits, lens, cfg, device, stats) \
            if cfg.max_new_tokens > 0 else [[] for _ in prompts]
        cache.rewind()
        correct, _ = _forced_run(model, cache, logits, lens, answers, device, stats)
        stats.cache_bytes = cache.memory_bytes()
        stats.generated_tokens = sum(len(o) for o in outs)
        return outs, correct, stats
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model, prompt: torch.Tensor, frames: Optional[torch.Tensor],
             cfg: GenerationConfig, use_cache: Optional[bool] = None) -> List[int]:
    """New token ids after ``prompt [1, S]`` (placeholders already expanded), stop token
    excluded. Every rank of the model-parallel group must call it with the same inputs.
    With the KV cache by default where the model has one (``use_cache=False``: recompute)."""
    outs, _ = generate_batch(model, [prompt], [frames], cfg, use_cache)
    return outs[0]


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
