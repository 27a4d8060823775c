"""Task encoder: one shard sample -> token ids (one IMAGE_TOKEN_INDEX per frame) + target mask.

The conversation is formatted by ``tokenizer.encode_chat`` (VILA's formats: media markers
placed as VILA's datasets place them; the built-in templates: a ``<video>`` marker becomes
``<image>\\n`` once per frame). Targets (``True``) are the assistant answers and their
end-of-turn token.
Frames stay encoded (JPEG/PNG bytes) until a micro-batch is assembled.

Only JSON, text and JPEG/PNG are decoded here: nothing in a shard is unpickled.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .image_transform import normalize_frames  # noqa: F401  (re-exported)
from .tokenizer import ChatTokenizer, encode_chat

IMAGE_EXTS = ("jpg", "jpeg", "png")


class SampleError(ValueError):
    """A shard sample the loader cannot use; the message names the shard, key and problem."""


@dataclass
class EncodedSample:
    key: str
    tokens: List[int]
    targets: List[bool]
    frames: List[bytes]  # encoded images, in frame order
    conversations: list
    dataset: int = 0

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def packed_length(self, tokens_per_frame: int) -> int:
        return len(self.tokens) + self.num_frames * (tokens_per_frame - 1)


def uniform_subset(n: int, k: int) -> List[int]:
    """k of range(n), spread uniformly, first and last included (k <= n)."""
    if k >= n:
        return list(range(n))
    if k <= 0:
        return []
    return [int(i) for i in np.round(np.linspace(0, n - 1, k)).astype(int)]


class TaskEncoder:
    def __init__(self, tokenizer: ChatTokenizer, num_frames: Optional[int] = None):
        self.tok = tokenizer
        self.num_frames = num_frames

    # -- conversation -> ids
    def encode_conversation(self, conversations: List[Dict[str, str]], num_frames: int
                            ) -> Tuple[List[int], List[bool]]:
        """Token ids (one IMAGE_TOKEN_INDEX per frame) and targets, in the tokenizer's chat
        format (``tokenizer.encode_chat``: VILA's formats or the built-in templates)."""
        try:
            return encode_chat(self.tok, conversations, num_frames)
        except ValueError as e:
            raise SampleError(str(e)) from e

    # -- shard sample -> EncodedSample
    def encode_sample(self, raw: Dict[str, Any], dataset: int = 0) -> EncodedSample:
        key = raw.get("__key__", "?")
        where = f"sample {key} of {raw.get('__url__', '?')}"
        if "json" not in raw:
            raise SampleError(f"{where}: no .json member (fields: {sorted(k for k in raw if not k.startswith('__'))})")
        try:
            meta = json.loads(raw["json"].decode("utf-8") if isinstance(raw["json"], bytes) else raw["json"])
            convs = meta["conversations"]
        except Exception as e:  # noqa: BLE001
            raise SampleError(f"{where}: bad .json ({type(e).__name__}: {e})") from e
        frame_keys = sorted((k for k in raw if not k.startswith("__") and k.rsplit(".", 1)[-1] in IMAGE_EXTS),
                            key=lambda k: (0, int(k.split(".")[0]), k) if k.split(".")[0].isdigit() else (1, 0, k))
        frames = [raw[k] for k in frame_keys]
        if self.num_frames is not None and len(frames) > self.num_frames:
            frames = [frames[i] for i in uniform_subset(len(frames), self.num_frames)]
        try:
            ids, tgt = self.encode_conversation(convs, len(frames))
        except SampleError as e:
            raise SampleError(f"{where}: {e}") from e
        return EncodedSample(key, ids, tgt, frames, convs, dataset)

    def subsample_to_fit(self, s: EncodedSample, seq_length: int, tokens_per_frame: int
                         ) -> Optional[EncodedSample]:
        """The sample with the most frames (uniformly kept) that fits ``seq_length``, or None
        when even one frame (or the text alone, for text samples) is too long."""
        n = s.num_frames
        if n <= 1:
            return None

        def with_k(k):
            ids, tgt = self.encode_conversation(s.conversations, k)
            return EncodedSample(s.key, ids, tgt, [s.frames[i] for i in uniform_subset(n, k)],
                                 s.conversations, s.dataset)

        lo, hi, best = 1, n - 1, None  # largest k in [1, n-1] that fits (length grows with k)
        while lo <= hi:
            mid = (lo + hi) // 2
            cand = with_k(mid)
            if cand.packed_length(tokens_per_frame) <= seq_length:
                best, lo = cand, mid + 1
            else:
                hi = mid - 1
        return best


def decode_frame_uint8(data: bytes, image_size: Optional[int], where: str = "") -> np.ndarray:
    """JPEG/PNG bytes -> uint8 RGB [H, W, 3] (resized to image_size if it is not already)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode != "RGB":
                im = im.convert("RGB")
            if image_size is not None and im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # noqa: BLE001
        raise SampleError(f"{where}: undecodable frame ({type(e).__name__}: {e})") from e
