"""The image transform of a vision tower, as VILA applies it to images and video frames.

VILA (``llava/mm_utils.py`` ``process_image``) reads two things: the checkpoint's
``image_aspect_ratio`` and the vision tower's image processor (``preprocessor_config.json``):
  resize  the image straight to the processor's size (Pillow's default bicubic), then the
          processor (which, at that size, only rescales and normalises);
  pad     pad to a square with the processor's mean colour (``int(255 * mean)`` per channel),
          the image centred, then the processor (resize to its size, rescale, normalise);
  other   the processor's own default: SigLIP's resizes straight to its size (so "resize"),
          CLIP-style processors (``crop_size`` / ``do_center_crop``) scale the shorter side
          and centre-crop ("crop").
Normalisation is ``(x * rescale_factor - mean) / std`` per channel in float32 after a float64
rescale (transformers' order of operations), done here through a 256-entry table per channel.

``ImageTransform.from_hf_checkpoint(dir)`` builds it from a VILA-layout checkpoint;
``from_preprocessor_config(path_or_dict, image_aspect_ratio)`` from a tower's config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .video import resize_frame

MODES = ("resize", "pad", "crop")
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageTransform:
    size: int
    mode: str = "resize"
    image_mean: Tuple[float, float, float] = SIGLIP_MEAN
    image_std: Tuple[float, float, float] = SIGLIP_STD
    rescale_factor: float = 1.0 / 255.0
    resample: int = int(Image.BICUBIC)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"image mode {self.mode!r} is not one of {MODES}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean / image_std must be 3 numbers (std > 0): "
                             f"{self.image_mean} / {self.image_std}")

    # -- construction
    @classmethod
    def from_preprocessor_config(cls, config: Union[str, dict], image_aspect_ratio: Optional[str] = None
                                 ) -> "ImageTransform":
        """``config``: a preprocessor_config.json path, its directory, or its dict."""
        where = "preprocessor config"
        if not isinstance(config, dict):
            path = config
            if os.path.isdir(path):
                path = os.path.join(path, "preprocessor_config.json")
            where = path
            try:
                with open(path) as f:
                    config = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read the image processor config {path}: {e}") from e
        crop = config.get("crop_size") if config.get("do_center_crop", "crop_size" in config) else None
        size = crop if crop is not None else config.get("size")
        if isinstance(size, dict):
            h, w = size.get("height"), size.get("width")
            if h is None and "shortest_edge" in size:
                h = w = size["shortest_edge"]
        else:
            h = w = size
        if h is None or h != w:
            raise ValueError(f"{where}: needs a square size (height == width), got {size!r}")
        if image_aspect_ratio in ("resize", "pad"):
            mode = image_aspect_ratio
        else:  # the processor's own default (VILA: "For Siglip, default is resize")
            mode = "crop" if crop is not None else "resize"
        mean = tuple(float(x) for x in config.get("image_mean", SIGLIP_MEAN))
        std = tuple(float(x) for x in config.get("image_std", SIGLIP_STD))
        if not config.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else 1.0
        return cls(int(h), mode, mean, std, rescale, int(config.get("resample", Image.BICUBIC)))

    @classmethod
    def from_hf_checkpoint(cls, hf_dir: str, image_aspect_ratio: Optional[str] = None
                           ) -> "ImageTransform":
        """A VILA-layout checkpoint: ``config.json``'s ``image_aspect_ratio`` (unless given)
        and ``vision_tower/preprocessor_config.json``."""
        if image_aspect_ratio is None:
            try:
                with open(os.path.join(hf_dir, "config.json")) as f:
                    image_aspect_ratio = json.load(f).get("image_aspect_ratio")
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read {hf_dir}/config.json: {e}") from e
        return cls.from_preprocessor_config(os.path.join(hf_dir, "vision_tower"), image_aspect_ratio)

    # -- pixels
    def geometry(self, frame: np.ndarray) -> np.ndarray:
        """RGB uint8 ``[H, W, 3]`` -> ``[size, size, 3]`` (the mode's resize / pad / crop)."""
        frame = np.asarray(frame)
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"expected an RGB uint8 [H, W, 3] frame, got {frame.dtype} {frame.shape}")
        if self.mode == "crop":
            return resize_frame(frame, self.size, "crop")
        img = Image.fromarray(frame)
        if self.mode == "pad":
            w, h = img.size
            if w != h:
                s = max(w, h)
                fill = tuple(int(255 * m) for m in self.image_mean)
                canvas = Image.new("RGB", (s, s), fill)
                canvas.paste(img, ((s - w) // 2, (s - h) // 2))
                img = canvas
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), resample=self.resample)
        return np.asarray(img)

    def lut(self) -> np.ndarray:
        """float32 [3, 256]: the normalised value of every byte, per channel."""
        x = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None]
        return ((x[None, :] - mean) / std).astype(np.float32)

    def normalize(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """uint8 [F, 3, H, W] -> float32 [F, 3, H, W]."""
        return normalize_frames(frames_u8, self.image_mean, self.image_std, self.rescale_factor)

    def __call__(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 frames -> float32 [F, 3, size, size], ready for the vision tower."""
        if not len(frames):
            return torch.zeros((0, 3, self.size, self.size), dtype=torch.float32)
        u8 = np.stack([self.geometry(f) for f in frames]).transpose(0, 3, 1, 2)
        return self.normalize(torch.from_numpy(np.ascontiguousarray(u8)))


_LUTS = {}


def normalize_frames(frames_u8: torch.Tensor, mean: Sequence[float] = SIGLIP_MEAN,
                     std: Sequence[float] = SIGLIP_STD, rescale_factor: float = 1.0 / 255.0
                     ) -> torch.Tensor:
    """uint8 [F, 3, H, W] -> float32 [F, 3, H, W] through a per-channel 256-entry table (exact
    and several times faster than the arithmetic on CPU)."""
    if frames_u8.dtype != torch.uint8:
        raise TypeError(f"expected uint8 frames, got {frames_u8.dtype}")
    key = (tuple(float(m) for m in mean), tuple(float(s) for s in std), float(rescale_factor))
    lut = _LUTS.get(key)
    if lut is None:
        lut = _LUTS[key] = ImageTransform(1, "resize", key[0], key[1], key[2]).lut()
    a = frames_u8.contiguous().numpy()
    if key[0][0] == key[0][1] == key[0][2] and key[1][0] == key[1][1] == key[1][2]:
        return torch.from_numpy(lut[0][a])
    out = np.empty(a.shape, dtype=np.float32)
    for c in range(3):
        out[:, c] = lut[c][a[:, c]]
    return torch.from_numpy(out)
