"""Inference inputs built the way NVlabs/VILA (HEAD, ``llava`` package) builds them, so that a
model sees at inference what VILA shows it (and what a VILA-trained checkpoint saw).

VILA's ``generate_content([media..., question])``:

- media: an image is one ``<image>`` marker; a video is ``config.num_video_frames`` frames
  sampled uniformly (first and last included), each one ``<image>`` marker. Frames go straight
  from the decoder to the image processor (no re-encoding), resized by the checkpoint's
  ``image_aspect_ratio`` (``resize``: straight to the tower's size, bicubic; ``pad``: grey
  square around the centre, then resized; anything else: the SigLIP processor's own resize).
- prompt: ``{"role": "user", "content": markers + question}`` (stripped) through the
  tokenizer's own chat template with the generation prompt, then the WHOLE string is tokenised
  (``tokenizer(text).input_ids``, markers as added special tokens).
- every marker becomes the frame's visual tokens followed by ``tokenizer("\\n").input_ids``
  (VILA's ``BasicImageEncoder`` end tokens).

:func:`vila_prompt_ids` returns ids with one ``IMAGE_TOKEN_INDEX`` per frame (expand them with
``generation.expand_image_tokens``); :func:`vila_media_settings` reads ``image_aspect_ratio``
and ``num_video_frames`` from a checkpoint (the HF top config the converter carries or writes).
"""

from __future__ import annotations

import copy
import json
import os
from typing import List, Optional, Sequence, Tuple

from ..constants import IMAGE_TOKEN_INDEX

MEDIA_MARKER = "<image>"  # VILA's MEDIA_TOKENS["image"]; videos are expanded to frames
DEFAULT_IMAGE_ASPECT_RATIO = "resize"  # what our exported configs say (hf_io.vila_top_config)
DEFAULT_NUM_VIDEO_FRAMES = 8


def resize_mode(image_aspect_ratio: Optional[str]) -> str:
    """VILA's ``image_aspect_ratio`` -> our ``data.video.resize_frame`` mode (SigLIP towers)."""
    if image_aspect_ratio == "pad":
        return "pad"
    # "resize", and every other value: SigLIP's processor resizes straight to its size.
    return "resize"


def vila_media_settings(load: Optional[str]) -> Tuple[str, int]:
    """``(image_aspect_ratio, num_video_frames)`` of a checkpoint: a VILA/HF folder's
    config.json, or a Megatron checkpoint's carried HF config (``hf_assets/config.json``);
    the exported defaults where neither says."""
    top = {}
    if load:
        for p in (os.path.join(load, "config.json"), os.path.join(load, "hf_assets", "config.json")):
            if os.path.isfile(p):
                with open(p) as f:
                    top = json.load(f)
                break
    ratio = top.get("image_aspect_ratio") or DEFAULT_IMAGE_ASPECT_RATIO
    frames = int(top.get("num_video_frames") or DEFAULT_NUM_VIDEO_FRAMES)
    return ratio, frames


def has_chat_template(hf_tokenizer) -> bool:
    return bool(getattr(hf_tokenizer, "chat_template", None))


def vila_prompt_ids(hf_tokenizer, question: str, num_frames: int) -> List[int]:
    """Token ids of VILA's generation prompt: ``num_frames`` media markers then ``question`` in
    the user turn, through the tokenizer's own chat template, whole-string tokenisation; each
    marker -> ``IMAGE_TOKEN_INDEX`` followed by the ids of ``tokenizer("\\n")``."""
    if not has_chat_template(hf_tokenizer):
        raise ValueError("the tokenizer has no chat template (tokenizer_config.json "
                         "'chat_template' or chat_template.jinja): VILA's prompt format needs one")
    tok = copy.deepcopy(hf_tokenizer)  # VILA adds its media tokens to the tokenizer
    tok.add_tokens([MEDIA_MARKER], special_tokens=True)
    marker = tok.convert_tokens_to_ids(MEDIA_MARKER)
    content = (MEDIA_MARKER * int(num_frames) + question).strip()
    text = tok.apply_chat_template([{"role": "user", "content": content}],
                                   add_generation_prompt=True, tokenize=False)
    ids = list(tok(text).input_ids)
    end = list(hf_tokenizer("\n").input_ids)
    out: List[int] = []
    for i in ids:
        out.extend([IMAGE_TOKEN_INDEX] + end if i == marker else [i])
    n = sum(1 for i in out if i == IMAGE_TOKEN_INDEX)
    if n != num_frames:
        raise ValueError(f"prompt holds {n} media markers for {num_frames} frames (does the "
                         f"question contain {MEDIA_MARKER!r}?)")
    return out


def vila_frames(paths: Sequence[str], num_video_frames: int, image_size: int,
                image_aspect_ratio: str):
    """Frames of images/videos as VILA loads them: decoded frames, resized by
    ``image_aspect_ratio``, SigLIP-normalised; no JPEG round trip. ``[F, 3, S, S]`` float32."""
    from .generation import prepare_frames, read_media
    frames = []
    for p in paths:
        frames.extend(read_media(p, num_video_frames))
    return prepare_frames(frames, image_size, resize_mode=resize_mode(image_aspect_ratio),
                          image_format=None)
