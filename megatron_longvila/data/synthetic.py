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
import sys
from typing import List, Optional, Sequence

import numpy as np

COLOURS = {
    "red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230), "yellow": (235, 220, 40),
    "magenta": (210, 40, 200), "cyan": (40, 210, 220), "white": (245, 245, 245),
    "orange": (245, 140, 20),
}
CODECS = {".mp4": ("libx264", "yuv420p"), ".mkv": ("libx264", "yuv420p"),
          ".webm": ("libvpx-vp9", "yuv420p")}


def draw_scene(rng: np.random.Generator) -> dict:
    """The random parts of a video (colours, background, direction), drawn from ``rng``."""
    names = list(COLOURS)
    sq, disc = rng.choice(len(names), 2, replace=False)
    bg = rng.integers(0, 90, 3)
    rightwards = bool(rng.integers(0, 2))
    return {"square": names[sq], "disc": names[disc], "bg": [int(c) for c in bg],
            "rightwards": rightwards}


def render_scene(scene: dict, n: int, width: int, height: int):
    """Frames [n, H, W, 3] uint8 of the scene: a square and a disc moving over a gradient."""
    bg = scene["bg"]
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.empty((height, width, 3), np.float32)
    for c in range(3):
        base[..., c] = bg[c] + 60 * xs / max(width - 1, 1) + 30 * ys / max(height - 1, 1)
    base = np.clip(base, 0, 255).astype(np.uint8)
    side = max(4, min(width, height) // 4)
    radius = max(3, min(width, height) // 6)
    sq_colour = np.array(COLOURS[scene["square"]], np.uint8)
    disc_colour = np.array(COLOURS[scene["disc"]], np.uint8)
    cx = width * 2 // 3
    frames = np.empty((n, height, width, 3), np.uint8)
    for t in range(n):
        a = t / max(n - 1, 1)
        img = frames[t]
        img[...] = base
        x0 = int((a if scene["rightwards"] else 1 - a) * (width - side))
        y0 = (height - side) // 3
        img[y0:y0 + side, x0:x0 + side] = sq_colour
        cy = int(radius + a * (height - 2 * radius - 1))
        # the disc, inside its bounding box only
        y_lo, y_hi = max(cy - radius, 0), min(cy + radius + 1, height)
        x_lo, x_hi = max(cx - radius, 0), min(cx + radius + 1, width)
        mask = ((xs[y_lo:y_hi, x_lo:x_hi] - cx) ** 2 + (ys[y_lo:y_hi, x_lo:x_hi] - cy) ** 2
                <= radius ** 2)
        img[y_lo:y_hi, x_lo:x_hi][mask] = disc_colour
    return frames


def render_frames(rng: np.random.Generator, n: int, width: int, height: int):
    """Frames [n, H, W, 3] uint8 of a square and a disc moving over a gradient, and a
    description of them."""
    scene = draw_scene(rng)
    desc = {"square": scene["square"], "disc": scene["disc"],
            "direction": "right" if scene["rightwards"] else "left"}
    return render_scene(scene, n, width, height), desc


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


def _write_one(job):
    path, scene, n, width, height, fps, gop_size = job
    write_video(path, render_scene(scene, n, width, height), fps, gop_size)
    return path


def make_synthetic_videos(out_dir: str, num_videos: int = 8, frames_per_video: int = 24,
                          width: int = 64, height: int = 48, fps: int = 8, seed: int = 0,
                          extensions: Sequence[str] = (".mp4",), num_text_only: int = 0,
                          annotation_name: str = "annotations.json",
                          gop_size: Optional[int] = None, num_workers: int = 1,
                          progress: bool = False) -> str:
    """Write the videos and a JSON annotation list; returns the annotation file's path.

    The random draws happen here, in order (the same videos for the same seed whatever
    ``num_workers``); rendering and encoding run in ``num_workers`` processes."""
    rng = np.random.default_rng(seed)
    vdir = os.path.join(out_dir, "videos")
    os.makedirs(vdir, exist_ok=True)
    entries: List[dict] = []
    jobs = []
    for i in range(num_videos):
        ext = extensions[i % len(extensions)]
        n = int(frames_per_video + rng.integers(0, max(1, frames_per_video // 2)))
        scene = draw_scene(rng)
        d = {"square": scene["square"], "disc": scene["disc"],
             "direction": "right" if scene["rightwards"] else "left"}
        rel = f"videos/vid_{i:04d}{ext}"
        jobs.append((os.path.join(out_dir, rel), scene, n, width, height, fps, gop_size))
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
    bar = None
    if progress and jobs:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="synthetic videos", unit="video", file=sys.stderr,
                   mininterval=0.5)
    workers = max(1, min(int(num_workers), len(jobs)))
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=1):
                if bar is not None:
                    bar.update(1)
    else:
        for job in jobs:
            _write_one(job)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    for j in range(num_text_only):
        entries.append({"id": f"text-{j}", "conversations": [
            {"from": "human", "value": f"Count to {j + 3}."},
            {"from": "gpt", "value": " ".join(str(k) for k in range(1, j + 4))}]})
    path = os.path.join(out_dir, annotation_name)
    with open(path, "w") as f:
        json.dump(entries, f, indent=1)
    return path


def synthetic_video_size(image_size: int):
    """(width, height) of the synthetic videos for frames of ``image_size``: twice the size
    for small images, the image size itself (4:3) for real towers (384 px): the preprocessing
    resizes to ``image_size`` either way, and encoding 4x the pixels only costs time."""
    scale = 2 if image_size <= 64 else 1
    return max(16, scale * image_size), max(16, 2 * ((scale * image_size * 3 // 4) // 2))


def make_synthetic_dataset(out_dir: str, num_videos: int = 16, num_frames: int = 4,
                           image_size: int = 32, seed: int = 0, num_text_only: int = 0,
                           shard_max_samples: int = 4, image_format: str = "jpg",
                           num_workers: int = 1, frames_per_video: int = 12,
                           resize_mode: str = "resize", progress: bool = False) -> str:
    """Synthetic mp4s -> shards through the real preprocessing; returns the shard directory."""
    from .preprocess import preprocess
    raw = os.path.join(out_dir, "raw")
    width, height = synthetic_video_size(image_size)
    ann = make_synthetic_videos(raw, num_videos=num_videos, frames_per_video=frames_per_video,
                                width=width, height=height, seed=seed,
                                num_text_only=num_text_only, num_workers=num_workers,
                                progress=progress)
    wds_dir = os.path.join(out_dir, "wds")
    summary = preprocess(ann, wds_dir, num_frames=num_frames, image_size=image_size,
                         shard_max_samples=shard_max_samples, image_format=image_format,
                         num_workers=num_workers, progress=progress, overwrite=True,
                         resize_mode=resize_mode)
    if summary.skipped:
        raise RuntimeError(f"synthetic preprocessing skipped samples: {summary.skipped}")
    return wds_dir


# ------------------------------------------------------------------ the trainer's embedded default

SYNTHETIC_FORMAT = 1  # bump when the content for the same settings changes
MANIFEST = "synthetic.json"


def synthetic_cache_root() -> str:
    """Where the embedded default keeps its datasets: $LONGVILA_SYNTHETIC_CACHE, else
    $XDG_CACHE_HOME/megatron_longvila/synthetic (~/.cache/...)."""
    env = os.environ.get("LONGVILA_SYNTHETIC_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_longvila", "synthetic")


def samples_for_run(requested: int, train_iters: int, global_batch_size: int,
                    parts: int) -> int:
    """How many synthetic samples a run needs: what it can consume (every micro-batch holds at
    least one sample: train_iters x global batch) but at most ``requested``, and at least one
    per loader part (DP ranks x workers). More would only be drawn and never read."""
    need = max(1, int(train_iters)) * max(1, int(global_batch_size))
    return max(int(parts), min(int(requested), need))


def cached_synthetic_dataset(out_dir: Optional[str], num_videos: int, num_frames: int,
                             image_size: int, seed: int, num_text_only: int = 0,
                             frames_per_video: int = 12, shard_max_samples: int = 16,
                             num_workers: int = 1, progress: bool = True):
    """The synthetic shards for these settings, made once: ``out_dir`` (default: a folder of
    :func:`synthetic_cache_root` named by the settings) is reused when its manifest names the
    same settings; else the dataset is written (videos drawn in ``num_workers`` processes)
    into a temporary sibling, which is renamed into place when complete (concurrent runs
    can't see half a dataset). Returns ``(shard_dir, reused)``."""
    import dataclasses
    import hashlib
    import shutil

    from ..utils.atomic import commit_dir, remove_stale_staging, staging_path
    from .preprocess import PreprocessConfig
    # the preprocessing defaults are part of the content (a changed default: another dataset)
    prep = {k: v for k, v in dataclasses.asdict(PreprocessConfig()).items()
            if k not in ("num_workers", "progress", "overwrite", "strict")}
    key = {"format": SYNTHETIC_FORMAT, "num_videos": int(num_videos),
           "num_text_only": int(num_text_only), "num_frames": int(num_frames),
           "frames_per_video": int(frames_per_video), "image_size": int(image_size),
           "seed": int(seed), "shard_max_samples": int(shard_max_samples),
           "preprocess_defaults": prep}
    if out_dir is None:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        out_dir = os.path.join(synthetic_cache_root(), f"synthetic-{digest}")
    out_dir = os.path.abspath(out_dir)
    manifest = os.path.join(out_dir, MANIFEST)

    def holds_key():
        try:
            with open(manifest) as f:
                return json.load(f) == key
        except (OSError, ValueError):
            return False

    if holds_key():
        return os.path.join(out_dir, "wds"), True
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(manifest):
        raise FileExistsError(f"{out_dir} exists and is not a synthetic dataset written by this "
                              "trainer (no synthetic.json); not overwriting it: choose another "
                              "--synthetic-dir or remove it")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    remove_stale_staging(out_dir)
    tmp = staging_path(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        make_synthetic_dataset(tmp, num_videos=num_videos, num_frames=num_frames,
                               image_size=image_size, seed=seed, num_text_only=num_text_only,
                               shard_max_samples=shard_max_samples, num_workers=num_workers,
                               frames_per_video=frames_per_video, progress=progress)
        shutil.rmtree(os.path.join(tmp, "raw"), ignore_errors=True)  # the shards hold the frames
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(key, f)
        if holds_key():  # another run finished the same dataset meanwhile
            shutil.rmtree(tmp, ignore_errors=True)
            return os.path.join(out_dir, "wds"), True
        commit_dir(tmp, out_dir, replace=True)  # ours with other settings (or none): replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(out_dir, "wds"), False
