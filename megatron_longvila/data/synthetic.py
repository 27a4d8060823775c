"""Synthetic but real videos (PyAV-encoded mp4/webm/mkv of moving shapes) and datasets of them.

``make_synthetic_videos(out_dir, num_videos, ...)`` writes ``out_dir/videos/*.mp4`` and
``out_dir/annotations.json`` (LLaVA/VILA conversations with a ``<video>`` marker whose answers
describe the video: colours of the moving square and disc, direction of motion).
``make_synthetic_dataset(out_dir, num_videos, num_frames, image_size, seed)`` runs those videos
through the real preprocessing path and returns the shard directory (``out_dir/wds``).
"""

from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import numpy as np

COLOURS = {
    "red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (235, 220, 40),
    "magenta": (210, 40, 200), "cyan": (40, 210, 220), "white": (245, 245, 245),
    "orange": (245, 140, 20),
}
CODECS = {".mp4": ("libx264", "yuv420p"), ".mkv": ("libx264", "yuv420p"),
          ".webm": ("libvpx-vp9", "yuv420p")}


def render_frames(rng: np.random.Generator, n: int, width: int, height: int):
    """Frames [n, H, W, 3] uint8 of a square and a disc moving over a gradient, and a
    description of them."""
    names = list(COLOURS)
    sq, disc = rng.choice(len(names), 2, replace=False)
    bg = rng.integers(0, 90, 3)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.empty((height, width, 3), np.float32)
    for c in range(3):
        base[..., c] = bg[c] + 60 * xs / max(width - 1, 1) + 30 * ys / max(height - 1, 1)
    side = max(4, min(width, height) // 4)
    radius = max(3, min(width, height) // 6)
    rightwards = bool(rng.integers(0, 2))
    frames = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        a = t / max(n - 1, 1)
        img = base.copy()
        x0 = int((a if rightwards else 1 - a) * (width - side))
        y0 = (height - side) // 3
        img[y0:y0 + side, x0:x0 + side] = COLOURS[names[sq]]
        cy = int(radius + a * (height - 2 * radius - 1))
        cx = width * 2 // 3
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2
        img[mask] = COLOURS[names[disc]]
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    desc = {"square": names[sq], "disc": names[disc],
            "direction": "right" if rightwards else "left"}
    return frames, desc


def write_video(path: str, frames: np.ndarray, fps: int = 8, gop_size: Optional[int] = None):
    import av
    ext = os.path.splitext(path)[1].lower()
    codec, pix = CODECS.get(ext, CODECS[".mp4"])
    n, h, w, _ = frames.shape
    tmp = path + ".part" + ext
    with av.open(tmp, mode="w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, pix
        if gop_size:
            stream.codec_context.gop_size = int(gop_size)
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for arr in frames:
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)


def make_synthetic_videos(out_dir: str, num_videos: int = 8, frames_per_video: int = 24,
                          width: int = 64, height: int = 48, fps: int = 8, seed: int = 0,
                          extensions: Sequence[str] = (".mp4",), num_text_only: int = 0,
                          annotation_name: str = "annotations.json",
                          gop_size: Optional[int] = None) -> str:
    """Write the videos and a JSON annotation list; returns the annotation file's path."""
    rng = np.random.default_rng(seed)
    vdir = os.path.join(out_dir, "videos")
    os.makedirs(vdir, exist_ok=True)
    entries: List[dict] = []
    for i in range(num_videos):
        ext = extensions[i % len(extensions)]
        n = int(frames_per_video + rng.integers(0, max(1, frames_per_video // 2)))
        frames, d = render_frames(rng, n, width, height)
        rel = f"videos/vid_{i:04d}{ext}"
        write_video(os.path.join(out_dir, rel), frames, fps, gop_size)
        q = ["What colour is the square?", "Which way does the square move?",
             "Describe the video."][i % 3]
        a = [f"The square is {d['square']}.", f"It moves to the {d['direction']}.",
             f"A {d['square']} square moves {d['direction']} while a {d['disc']} disc "
             f"falls."][i % 3]
        conv = [{"from": "human", "value": f"<video>\n{q}"}, {"from": "gpt", "value": a}]
        if i % 4 == 3:  # some multi-turn samples
            conv += [{"from": "human", "value": "And the disc?"},
                     {"from": "gpt", "value": f"The disc is {d['disc']}."}]
        entries.append({"id": f"synthetic-{i}", "video": rel, "conversations": conv})
    for j in range(num_text_only):
        entries.append({"id": f"text-{j}", "conversations": [
            {"from": "human", "value": f"Count to {j + 3}."},
            {"from": "gpt", "value": " ".join(str(k) for k in range(1, j + 4))}]})
    path = os.path.join(out_dir, annotation_name)
    with open(path, "w") as f:
        json.dump(entries, f, indent=1)
    return path


def make_synthetic_dataset(out_dir: str, num_videos: int = 16, num_frames: int = 4,
                           image_size: int = 32, seed: int = 0, num_text_only: int = 0,
                           shard_max_samples: int = 4, image_format: str = "jpg",
                           num_workers: int = 1, frames_per_video: int = 12,
                           resize_mode: str = "resize") -> str:
    """Synthetic mp4s -> shards through the real preprocessing; returns the shard directory."""
    from .preprocess import preprocess
    raw = os.path.join(out_dir, "raw")
    ann = make_synthetic_videos(raw, num_videos=num_videos, frames_per_video=frames_per_video,
                                width=max(16, image_size * 2), height=max(16, 2 * (image_size * 3 // 4)),
                                seed=seed, num_text_only=num_text_only)
    wds_dir = os.path.join(out_dir, "wds")
    summary = preprocess(ann, wds_dir, num_frames=num_frames, image_size=image_size,
                         shard_max_samples=shard_max_samples, image_format=image_format,
                         num_workers=num_workers, progress=False, overwrite=True,
                         resize_mode=resize_mode)
    if summary.skipped:
        raise RuntimeError(f"synthetic preprocessing skipped samples: {summary.skipped}")
    return wds_dir
