"""A synthetic video needle-in-a-haystack task, small enough to learn on a CPU.

Haystack frames are plain grey (a grey level per video, drifting a little from frame to frame,
with faint noise). The needle is one frame showing a coloured square (random size and place)
on the same kind of grey. The question asks the square's colour; the answer is one colour word
out of ``NEEDLE_COLOURS`` (chance 1/6 with the default six).

* :func:`make_needle_videos` writes training videos (real mp4s, one needle frame each at a
  random position) and their LLaVA/VILA annotations; :func:`make_needle_dataset` also runs them
  through the real preprocessing into shards (frames sampled at the videos' own frame rate, so
  every frame is kept, the needle included, and frame counts may vary per video).
* :func:`make_needle_eval_set` writes a held-out haystack video and needle images (PNG) with a
  ``needles.json`` of ``{"image", "question", "answer"}`` entries: the input of
  ``tools/eval_needle.py``.
"""

from __future__ import annotations

import json
import os
from typing import List, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..data.preprocess import preprocess
from ..data.synthetic import write_video

NEEDLE_COLOURS = {
    "red": (220, 30, 30), "green": (30, 190, 50), "blue": (40, 60, 230),
    "yellow": (235, 220, 40), "magenta": (210, 40, 200), "cyan": (40, 210, 220),
}
NEEDLE_QUESTION = "What colour is the square?"
FPS = 8


def haystack_frames(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``[n, size, size, 3]`` uint8 plain grey frames (the level drifts from frame to frame).

    Flat on purpose: pixel noise would survive as PNG but not through the video codec, and a
    tiny model latches onto that difference instead of the colour."""
    level = rng.uniform(70, 180)
    levels = np.clip(level + np.cumsum(rng.normal(0, 3, n)), 40, 215)
    frames = np.broadcast_to(levels[:, None, None, None], (n, size, size, 3))
    return np.ascontiguousarray(frames).round().astype(np.uint8)


def draw_needle(rng: np.random.Generator, frame: np.ndarray, colour: str) -> np.ndarray:
    """A copy of ``frame`` with a ``colour`` square of side 1/2..3/4 of the frame."""
    size = frame.shape[0]
    side = int(rng.integers(size // 2, 3 * size // 4 + 1))
    y, x = rng.integers(0, size - side + 1, 2)
    out = frame.copy()
    out[y:y + side, x:x + side] = NEEDLE_COLOURS[colour]
    return out


def _frame_count(rng, frames: Union[int, Tuple[int, int]]) -> int:
    if isinstance(frames, int):
        return frames
    lo, hi = frames
    return int(rng.integers(lo, hi + 1))


def make_needle_videos(out_dir: str, num_videos: int = 256,
                       frames_per_video: Union[int, Tuple[int, int]] = (4, 8), size: int = 64,
                       seed: int = 0, colours: Sequence[str] = tuple(NEEDLE_COLOURS),
                       annotation_name: str = "annotations.json") -> str:
    """Training videos ``out_dir/videos/needle_*.mp4`` (``frames_per_video`` frames, or a
    random count in ``[lo, hi]``; one needle frame at a uniformly random index) and their
    annotations; returns the annotation file's path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    entries: List[dict] = []
    for i in range(num_videos):
        n = _frame_count(rng, frames_per_video)
        colour = colours[int(rng.integers(len(colours)))]
        frames = haystack_frames(rng, n, size)
        at = int(rng.integers(n))
        frames[at] = draw_needle(rng, frames[at], colour)
        rel = f"videos/needle_{i:05d}.mp4"
        write_video(os.path.join(out_dir, rel), frames, fps=FPS)
        entries.append({"id": f"needle-{i}", "video": rel, "needle_index": at, "num_frames": n,
                        "conversations": [
                            {"from": "human", "value": f"<video>\n{NEEDLE_QUESTION}"},
                            {"from": "gpt", "value": colour}]})
    path = os.path.join(out_dir, annotation_name)
    with open(path, "w") as f:
        json.dump(entries, f, indent=1)
    return path


def make_needle_dataset(out_dir: str, num_videos: int = 256,
                        frames_per_video: Union[int, Tuple[int, int]] = (4, 8), size: int = 64,
                        image_size: int = 32, seed: int = 0, shard_max_samples: int = 64,
                        num_workers: int = 1) -> str:
    """Needle training videos -> shards through the real preprocessing; returns the shard
    directory. Frames are sampled at the videos' frame rate, so all of them are kept."""
    raw = os.path.join(out_dir, "raw")
    ann = make_needle_videos(raw, num_videos, frames_per_video, size, seed)
    wds = os.path.join(out_dir, "wds")
    summary = preprocess(ann, wds, fps=float(FPS), image_size=image_size,
                         shard_max_samples=shard_max_samples, num_workers=num_workers,
                         progress=False, overwrite=True)
    if summary.skipped:
        raise RuntimeError(f"needle preprocessing skipped samples: {summary.skipped}")
    return wds


def make_needle_eval_set(out_dir: str, haystack_frames_count: int = 64, size: int = 64,
                         needles_per_colour: int = 2, seed: int = 10_000,
                         colours: Sequence[str] = tuple(NEEDLE_COLOURS)) -> str:
    """A held-out haystack video ``out_dir/haystack.mp4`` and needle images
    ``out_dir/needles/*.png`` listed in ``out_dir/needles.json``; returns that JSON's path.
    Use a seed the training data did not use."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "needles"), exist_ok=True)
    write_video(os.path.join(out_dir, "haystack.mp4"),
                haystack_frames(rng, haystack_frames_count, size), fps=FPS)
    entries = []
    for k in range(needles_per_colour):
        for colour in colours:
            bg = haystack_frames(rng, 1, size)[0]
            rel = f"needles/{colour}_{k}.png"
            Image.fromarray(draw_needle(rng, bg, colour)).save(os.path.join(out_dir, rel))
            entries.append({"image": rel, "question": NEEDLE_QUESTION, "answer": colour})
    path = os.path.join(out_dir, "needles.json")
    with open(path, "w") as f:
        json.dump(entries, f, indent=1)
    return path
