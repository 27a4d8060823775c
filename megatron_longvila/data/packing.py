"""Packing: encoded samples -> one micro-batch dict (the contract in ``data/__init__.py``).

A row holds whole samples up to ``seq_length`` tokens after each frame placeholder is expanded
to ``tokens_per_frame`` IMAGE_TOKEN_INDEX ids; the rest of the row is padding, its own segment.
``micro_batch_size`` rows are concatenated into one row of ``seq_length * micro_batch_size``.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .task_encoder import EncodedSample, decode_frame_uint8, normalize_frames
from .text import TextChunk


def expand_sample(s: EncodedSample, tokens_per_frame: int):
    """-> (tokens, labels) as int64 arrays of the packed length; labels already shifted."""
    toks = np.asarray(s.tokens, dtype=np.int64)
    tgt = np.asarray(s.targets, dtype=bool)
    reps = np.where(toks == IMAGE_TOKEN_INDEX, tokens_per_frame, 1)
    toks = np.repeat(toks, reps)
    tgt = np.repeat(tgt, reps)
    labels = np.full_like(toks, IGNORE_INDEX)
    if len(toks) > 1:
        nxt_tgt = tgt[1:]
        labels[:-1] = np.where(nxt_tgt, toks[1:], IGNORE_INDEX)
    return toks, labels


def build_micro_batch(rows: Sequence[Sequence[EncodedSample]], seq_length: int,
                      micro_batch_size: int, tokens_per_frame: int, pad_id: int,
                      image_size: int, normalize: bool = True) -> dict:
    """``normalize=False`` leaves ``frames`` as uint8 [F, 3, H, W] (4x less to send from a
    worker process; ``normalize_frames`` finishes the job)."""
    tokens, labels, pos, frames = [], [], [], []
    cu = [0]
    fps: List[int] = []
    keys: List[str] = []
    rows = list(rows) + [[] for _ in range(micro_batch_size - len(rows))]
    for row in rows:
        used = 0
        for s in row:
            if isinstance(s, TextChunk):  # a text row: one segment per document piece
                if used + len(s.tokens) > seq_length:
                    raise ValueError(f"text chunk {s.key} ({len(s.tokens)} tokens) overflows the row")
                tokens.append(s.tokens)
                labels.append(s.labels)
                for n, k in zip(s.seg_lens, s.seg_keys):
                    pos.append(np.arange(n, dtype=np.int64))
                    cu.append(cu[-1] + n)
                    fps.append(0)
                    keys.append(k)
                used += len(s.tokens)
                continue
            t, l = expand_sample(s, tokens_per_frame)
            if used + len(t) > seq_length:
                raise ValueError(f"sample {s.key} ({len(t)} tokens) overflows the row")
            tokens.append(t)
            labels.append(l)
            pos.append(np.arange(len(t), dtype=np.int64))
            used += len(t)
            cu.append(cu[-1] + len(t))
            fps.append(s.num_frames)
            keys.append(s.key)
            frames.extend(f if isinstance(f, np.ndarray)  # already decoded by the loader
                          else decode_frame_uint8(f, image_size, f"sample {s.key}")
                          for f in s.frames)
        pad = seq_length - used
        if pad > 0:
            tokens.append(np.full(pad, pad_id, dtype=np.int64))
            labels.append(np.full(pad, IGNORE_INDEX, dtype=np.int64))
            pos.append(np.arange(pad, dtype=np.int64))
            cu.append(cu[-1] + pad)
            fps.append(0)
    if frames:
        fr = torch.from_numpy(np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2)))
    else:
        fr = torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8)
    if normalize:
        fr = normalize_frames(fr)
    return {
        "tokens": torch.from_numpy(np.concatenate(tokens))[None],
        "labels": torch.from_numpy(np.concatenate(labels))[None],
        "position_ids": torch.from_numpy(np.concatenate(pos))[None],
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "frames": fr,
        "frames_per_sample": torch.tensor(fps, dtype=torch.int64),
        "num_samples": len(keys),
        "sample_keys": keys,
    }
