"""Task encoder: one shard sample -> token ids (one IMAGE_TOKEN_INDEX per frame) + target mask.

A ``<video>`` marker becomes ``<image>\\n`` once per frame (VILA); a sample with frames but no
marker gets them in front of its first user turn; each ``<image>`` becomes one
IMAGE_TOKEN_INDEX. Targets (``True``) are the assistant answers and their end-of-turn token.
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

from ..constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN, IMAGE_TOKEN_INDEX
from .tokenizer import ChatTokenizer

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
        tpl = self.tok.template
        convs = [dict(t) for t in conversations]
        n_markers = sum(t["value"].count(DEFAULT_VIDEO_TOKEN) + t["value"].count(DEFAULT_IMAGE_TOKEN)
                        for t in convs)
        if num_frames and n_markers == 0:
            first_user = next((t for t in convs if t["from"] in ("human", "user")), None)
            if first_user is None:
                raise SampleError("sample has frames but no user turn to put them in")
            first_user["value"] = DEFAULT_VIDEO_TOKEN + "\n" + first_user["value"]
        frame_text = (DEFAULT_IMAGE_TOKEN + "\n") * num_frames
        for t in convs:
            v = t["value"]
            if DEFAULT_VIDEO_TOKEN in v:
                # "<video>\n" -> "<image>\n" * F (do not leave a doubled newline).
                v = v.replace(DEFAULT_VIDEO_TOKEN + "\n", frame_text).replace(DEFAULT_VIDEO_TOKEN, frame_text)
            elif DEFAULT_IMAGE_TOKEN in v and num_frames != 1:
                v = v.replace(DEFAULT_IMAGE_TOKEN + "\n", frame_text).replace(DEFAULT_IMAGE_TOKEN, frame_text)
            t["value"] = v
        ids: List[int] = []
        tgt: List[bool] = []

        def add(piece_ids, target):
            ids.extend(piece_ids)
            tgt.extend([target] * len(piece_ids))

        add(self.tok.encode_template(tpl.prefix), False)
        start = 0
        if convs and convs[0]["from"] == "system":
            system, start = convs[0]["value"], 1
        else:
            system = self.tok.system_prompt
        if system is not None:
            pre, post = tpl.system.split("{content}")
            add(self.tok.encode_template(pre), False)
            add(self.tok.encode_text(system), False)
            add(self.tok.encode_template(post), False)
        upre, upost = tpl.user.split("{content}")
        for t in convs[start:]:
            if t["from"] == "system":
                raise SampleError("a system turn after the first turn")
            if t["from"] in ("human", "user"):
                add(self.tok.encode_template(upre), False)
                self._add_content(t["value"], add)
                add(self.tok.encode_template(upost), False)
            else:
                add(self.tok.encode_template(tpl.assistant_header), False)
                add(self.tok.encode_text(t["value"]), True)
                add(self.tok.encode_template(tpl.assistant_end), True)
                add(self.tok.encode_template(tpl.after_assistant), False)
        n_img = sum(1 for i in ids if i == IMAGE_TOKEN_INDEX)
        if n_img != num_frames:
            raise SampleError(f"{n_img} image markers for {num_frames} frames")
        return ids, tgt

    def _add_content(self, text: str, add):
        parts = text.split(DEFAULT_IMAGE_TOKEN)
        for i, part in enumerate(parts):
            if i:
                add([IMAGE_TOKEN_INDEX], False)
            add(self.tok.encode_text(part), False)

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


# (x/255 - 0.5) / 0.5 for every byte value, computed in float32 like the formula itself.
_SIGLIP_LUT = ((np.arange(256, dtype=np.float32) / np.float32(255.0) - np.float32(0.5))
               / np.float32(0.5)).astype(np.float32)


def normalize_frames(frames_u8: "torch.Tensor") -> "torch.Tensor":
    """uint8 [F, 3, H, W] -> float32 [F, 3, H, W], SigLIP normalisation ((x/255 - 0.5) / 0.5)
    (a 256-entry table: exact and several times faster than the arithmetic on CPU)."""
    if frames_u8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 frames, got {frames_u8.dtype}")
    return torch.from_numpy(_SIGLIP_LUT[frames_u8.contiguous().numpy()])
