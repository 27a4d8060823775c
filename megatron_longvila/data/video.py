"""Video and image decoding for the data pipeline (PyAV and Pillow).

``decode_video(path, num_frames=..., fps=..., max_frames=..., start=..., end=...)`` returns the
sampled frames as RGB uint8 arrays ``[H, W, 3]`` in presentation order, with their times.
``resize_frame(array, size, mode)`` brings one frame to the encoder's square size.

Frame selection works on the presentation timestamps of the video stream's packets (a demux
pass, no decoding), so it is exact and does not trust the container's frame count; a second
pass decodes up to the last selected frame and keeps only the selected ones. Any problem is a
``MediaError`` whose message says what is wrong with which file.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
RESIZE_MODES = ("crop", "resize", "pad")


class MediaError(Exception):
    """A video or image that cannot be used; the message names the file and the reason."""


@dataclass
class DecodedVideo:
    frames: List[np.ndarray]  # [H, W, 3] uint8 RGB each
    times: List[float]  # seconds from the start of the stream, one per frame
    indices: List[int]  # index of each selected frame among all frames (presentation order)
    total_frames: int  # frames in the stream (or in the [start, end] window's video)
    duration: float  # seconds covered by the stream
    extra: dict = field(default_factory=dict)


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def select_indices(times: Sequence[float], num_frames: Optional[int] = None,
                   fps: Optional[float] = None, max_frames: Optional[int] = None,
                   start: Optional[float] = None, end: Optional[float] = None) -> List[int]:
    """Indices (into ``times``, sorted ascending) of the frames to keep.

    ``num_frames``: N frames uniformly over the window (first and last frame included; when the
    window has fewer frames than N, some repeat, so every sample gets exactly N).
    ``fps``: one frame every 1/fps seconds from the window start, at most ``max_frames`` (the
    kept ones then spread uniformly over those).
    """
    times = np.asarray(times, dtype=np.float64)
    window = np.arange(len(times))
    if start is not None:
        window = window[times[window] >= start - 1e-6]
    if end is not None:
        window = window[times[window] <= end + 1e-6]
    if len(window) == 0:
        return []
    if fps is not None and fps > 0:
        t0, t1 = times[window[0]], times[window[-1]]
        targets = t0 + np.arange(0, int(np.floor((t1 - t0) * fps + 1e-9)) + 1) / fps
        wt = times[window]
        pos = np.clip(np.searchsorted(wt, targets), 0, len(wt) - 1)
        prev = np.clip(pos - 1, 0, len(wt) - 1)
        nearest = np.where(np.abs(wt[prev] - targets) <= np.abs(wt[pos] - targets), prev, pos)
        chosen = window[nearest]
        if max_frames and len(chosen) > max_frames:
            chosen = chosen[np.round(np.linspace(0, len(chosen) - 1, max_frames)).astype(int)]
        return [int(i) for i in chosen]
    n = int(num_frames or 1)
    if max_frames:
        n = min(n, int(max_frames))
    pick = np.round(np.linspace(0, len(window) - 1, n)).astype(int)
    return [int(window[i]) for i in pick]


def _open(path):
    import av
    if not os.path.exists(path):
        raise MediaError(f"missing file: {path}")
    if os.path.getsize(path) == 0:
        raise MediaError(f"empty file (0 bytes): {path}")
    try:
        container = av.open(path)
    except Exception as e:  # noqa: BLE001 - PyAV raises many error types
        raise MediaError(f"unreadable video {path}: {type(e).__name__}: {e}") from e
    if not container.streams.video:
        container.close()
        raise MediaError(f"no video stream in {path}")
    return container


def decode_video(path: str, num_frames: Optional[int] = 8, fps: Optional[float] = None,
                 max_frames: Optional[int] = None, start: Optional[float] = None,
                 end: Optional[float] = None, threads: bool = False) -> DecodedVideo:
    """Decode the selected frames of ``path`` (see ``select_indices``) as RGB uint8 arrays.

    ``threads``: let FFmpeg decode with several threads. Off by default: with frame threading
    every keyframe seek flushes the pipeline, which made sparse sampling ~1.7x slower here;
    parallelism comes from preprocessing's worker processes instead."""
    import av
    container = _open(path)
    try:
        stream = container.streams.video[0]
        tb = stream.time_base
        # Pass 1: presentation timestamps of all frames and of the keyframes (demux only).
        # Every stream is demuxed (cheap) to see where the data really ends.
        pts, keys = [], []
        data_end = 0.0
        try:
            for packet in container.demux():
                if not packet.size or packet.pts is None:
                    continue
                if packet.stream.index == stream.index:
                    pts.append(int(packet.pts))
                    if packet.is_keyframe:
                        keys.append(int(packet.pts))
                if packet.time_base is not None:
                    data_end = max(data_end, float((packet.pts + (packet.duration or 0))
                                                   * packet.time_base))
        except av.error.FFmpegError as e:
            raise MediaError(f"corrupt video {path} while reading packets: {e}") from e
        if not pts:
            raise MediaError(f"no video frames in {path}")
        if container.duration and container.duration > 0:
            # The header's duration (mkv/webm write it at the end of muxing) against the data.
            header_end = ((container.start_time or 0) + container.duration) / 1e6
            if data_end < 0.9 * header_end and header_end - data_end > 1.0:
                raise MediaError(f"truncated video {path}: the data ends at {data_end:.2f}s, "
                                 f"the header says {header_end:.2f}s")
        pts = sorted(set(pts))
        keys = sorted(set(keys)) or [pts[0]]
        declared = int(stream.frames or 0)
        if declared and len(pts) < declared:
            raise MediaError(f"truncated video {path}: container declares {declared} frames, "
                             f"only {len(pts)} present")
        first = pts[0]
        times = [float((p - first) * tb) for p in pts]
        if start is not None and end is not None and end < start:
            raise MediaError(f"bad segment for {path}: end {end} < start {start}")
        sel = select_indices(times, num_frames=num_frames, fps=fps, max_frames=max_frames,
                             start=start, end=end)
        if not sel:
            raise MediaError(f"no frames of {path} in the segment [{start}, {end}] "
                             f"(video is {times[-1]:.3f}s long)")
        wanted = {pts[i] for i in sel}
        # Pass 2: decode forward, jumping (seek to the keyframe at or before the next wanted
        # frame) whenever that keyframe lies beyond what has been decoded: only the GOPs that
        # hold wanted frames are decoded, which matters for long videos and few frames.
        if threads:
            stream.thread_type = "AUTO"
        got = {}
        frames_iter = None
        last = None  # pts of the last decoded frame
        seeks = decoded = 0
        try:
            for target in sorted(wanted):
                if target in got:
                    continue
                k = keys[max(0, bisect.bisect_right(keys, target) - 1)]
                if frames_iter is None or last is None or k > last:
                    container.seek(k, stream=stream, backward=True, any_frame=False)
                    frames_iter = container.decode(stream)
                    seeks += 1
                for frame in frames_iter:
                    if frame.pts is None:
                        continue
                    decoded += 1
                    last = frame.pts
                    if frame.pts in wanted and frame.pts not in got:
                        got[frame.pts] = frame.to_ndarray(format="rgb24")
                    if frame.pts >= target:
                        break
        except av.error.FFmpegError as e:
            raise MediaError(f"corrupt video {path} while decoding: {e}") from e
        fallback = len(got) < len(wanted) and seeks > 1
        if fallback:
            # A seek that landed after a wanted frame (odd keyframe flags): decode it all.
            container.seek(pts[0], stream=stream, backward=True, any_frame=False)
            try:
                for frame in container.decode(stream):
                    if frame.pts in wanted and frame.pts not in got:
                        got[frame.pts] = frame.to_ndarray(format="rgb24")
                        if len(got) == len(wanted):
                            break
            except av.error.FFmpegError as e:
                raise MediaError(f"corrupt video {path} while decoding: {e}") from e
        if len(got) < len(wanted):
            raise MediaError(f"truncated or corrupt video {path}: decoded {len(got)} of "
                             f"{len(wanted)} selected frames")
        frames = [got[pts[i]] for i in sel]
        return DecodedVideo(frames=frames, times=[times[i] for i in sel], indices=list(sel),
                            total_frames=len(pts), duration=times[-1],
                            extra={"avg_fps": float(stream.average_rate or 0), "seeks": seeks,
                                   "decoded": decoded, "keyframes": len(keys),
                                   "fallback": fallback})
    finally:
        container.close()


def load_image(path: str) -> np.ndarray:
    if not os.path.exists(path):
        raise MediaError(f"missing file: {path}")
    if os.path.getsize(path) == 0:
        raise MediaError(f"empty file (0 bytes): {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001
        raise MediaError(f"unreadable image {path}: {type(e).__name__}: {e}") from e


def resize_frame(frame: np.ndarray, size: int, mode: str = "resize") -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` -> ``[size, size, 3]``. The default is VILA's for SigLIP towers
    (``image_aspect_ratio: resize``; see ``data/image_transform.py``).

    crop: scale the shorter side to ``size`` (bicubic), centre crop. resize: scale straight to
    ``size`` x ``size``. pad: pad to a square with grey (127) around the centre, then scale.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES}")
    img = Image.fromarray(frame)
    w, h = img.size
    if mode == "resize":
        out = img.resize((size, size), Image.BICUBIC)
    elif mode == "pad":
        s = max(w, h)
        canvas = Image.new("RGB", (s, s), (127, 127, 127))
        canvas.paste(img, ((s - w) // 2, (s - h) // 2))
        out = canvas.resize((size, size), Image.BICUBIC)
    else:
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        out = img.crop((left, top, left + size, top + size))
    return np.asarray(out)
