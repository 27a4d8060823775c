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
from typing import Any, Dict, List, Optional, Sequence, Tuple

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

    Both modes sample uniformly in TIME, so a variable-frame-rate video is covered evenly:
    ``num_frames``: N instants evenly spaced from the window's first to its last frame, each
    taking the frame nearest to it (when the window has fewer frames than N, some repeat, so
    every sample gets exactly N; on a constant frame rate these are the evenly spaced indices).
    ``fps``: one instant every 1/fps seconds from the window start, at most ``max_frames``
    (the kept ones then spread uniformly over those).
    """
    times = np.asarray(times, dtype=np.float64)
    window = np.arange(len(times))
    if start is not None:
        window = window[times[window] >= start - 1e-6]
    if end is not None:
        window = window[times[window] <= end + 1e-6]
    if len(window) == 0:
        return []
    wt = times[window]
    if fps is not None and fps > 0:
        t0, t1 = wt[0], wt[-1]
        targets = t0 + np.arange(0, int(np.floor((t1 - t0) * fps + 1e-9)) + 1) / fps
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
    targets = np.linspace(wt[0], wt[-1], n)
    # The fractional frame position of each instant (piecewise linear between frame times);
    # rounding it takes the nearer frame. Rounded to 1e-6 first so that float noise does not
    # break ties differently from the plain index spacing of a constant-rate video.
    frac = np.interp(targets, wt, np.arange(len(wt), dtype=np.float64)) if len(wt) > 1 \
        else np.zeros(n)
    pick = np.clip(np.round(np.round(frac, 6)).astype(int), 0, len(wt) - 1)
    return [int(window[i]) for i in pick]


# ----------------------------------------------------------------------------- geometry

def _display_matrix(frame, stream=None) -> Optional[np.ndarray]:
    """The frame's display matrix (9 int32, 16.16 fixed point, FFmpeg's layout) or None.
    Decoders attach the container's matrix (mp4 ``tkhd``, mkv projection) to every frame as
    side data; older FFmpeg builds exposed only a ``rotate`` stream tag instead."""
    try:
        for sd in frame.side_data:
            name = getattr(getattr(sd, "type", None), "name", str(getattr(sd, "type", "")))
            if str(name).upper().endswith("DISPLAYMATRIX"):
                m = np.frombuffer(bytes(sd), dtype="<i4")
                if m.size >= 9:
                    return m[:9].copy()
    except Exception:  # noqa: BLE001 - side data API differs across PyAV versions
        pass
    if stream is not None:
        tag = (stream.metadata or {}).get("rotate")
        if tag:
            try:  # clockwise degrees to turn the picture for display
                deg = float(tag) % 360
            except ValueError:
                return None
            th = np.deg2rad(-deg)  # the matrix of a clockwise turn
            c, s = np.cos(th), np.sin(th)
            return np.array([c, -s, 0, s, c, 0, 0, 0, 1]) * 65536
    return None


def display_transform(matrix) -> Tuple[bool, bool, bool]:
    """(transpose, hflip, vflip) that shows a frame as the display matrix says, applied in
    that order; the matrix maps a coded pixel (x, y) to (a*x + c*y, b*x + d*y) with
    (a, b, c, d) = matrix[0, 1, 3, 4]. Rotations by multiples of 90 degrees and mirrors; any
    other angle is snapped to the nearest multiple of 90 (players differ there)."""
    if matrix is None:
        return False, False, False
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    if abs(a) + abs(d) >= abs(b) + abs(c):  # no quarter turn
        return False, a < 0, d < 0
    return True, c < 0, b < 0  # after the transpose, x' follows c*y and y' follows b*x


def apply_display(frame: np.ndarray, transform: Tuple[bool, bool, bool]) -> np.ndarray:
    transpose, hflip, vflip = transform
    if transpose:
        frame = frame.transpose(1, 0, 2)
    if hflip:
        frame = frame[:, ::-1]
    if vflip:
        frame = frame[::-1]
    return np.ascontiguousarray(frame)


def apply_pixel_aspect(frame: np.ndarray, sar) -> np.ndarray:
    """Stretch a coded frame with non-square pixels (sample aspect ratio ``sar``) to its
    display aspect ratio: wider pixels widen the picture, narrower ones make it taller (no
    resolution is thrown away)."""
    if not sar or sar <= 0 or abs(float(sar) - 1.0) < 1e-3:
        return frame
    h, w = frame.shape[:2]
    if sar > 1:
        w = max(1, int(round(w * float(sar))))
    else:
        h = max(1, int(round(h / float(sar))))
    return np.asarray(Image.fromarray(frame).resize((w, h), Image.BICUBIC))


# ----------------------------------------------------------------------------- decoding

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


def _stream_sar(stream):
    for obj in (stream, getattr(stream, "codec_context", None)):
        try:
            sar = getattr(obj, "sample_aspect_ratio", None)
        except Exception:  # noqa: BLE001
            sar = None
        if sar:
            return sar
    return None


def decode_video(path: str, num_frames: Optional[int] = 8, fps: Optional[float] = None,
                 max_frames: Optional[int] = None, start: Optional[float] = None,
                 end: Optional[float] = None, threads: bool = False) -> DecodedVideo:
    """Decode the selected frames of ``path`` (see ``select_indices``) as a player shows them:
    RGB uint8 arrays upright (display matrix applied) with square pixels (sample aspect ratio
    applied), and their presentation times in seconds from the first frame shown.

    Frames that an edit list hides (packets the demuxer flags as discarded) are neither
    counted nor timed. A stream without timestamps (raw ``.h264``) is decoded in order and
    timed by frame index at its declared rate (``extra["timing"] == "frame index"``).

    ``threads``: let FFmpeg decode with several threads. Off by default: with frame threading
    every keyframe seek flushes the pipeline, which made sparse sampling ~1.7x slower here;
    parallelism comes from preprocessing's worker processes instead."""
    import av
    if start is not None and end is not None and end < start:
        raise MediaError(f"bad segment for {path}: end {end} < start {start}")
    container = _open(path)
    try:
        stream = container.streams.video[0]
        tb = stream.time_base
        # Pass 1 (demux only, no decoding): the presentation timestamps of the frames shown and
        # the keyframes (with their decoding timestamps, for seeking). Every stream is demuxed
        # (cheap) to see where the data really ends.
        pts, keys = [], {}
        packets = untimed = 0
        data_end = 0.0
        try:
            for packet in container.demux():
                if not packet.size:
                    continue
                if packet.stream.index == stream.index:
                    packets += 1
                    if packet.pts is None:
                        untimed += 1
                        continue
                    p = int(packet.pts)
                    if packet.is_keyframe:  # a discarded keyframe is still where decoding starts
                        d = int(packet.dts) if packet.dts is not None else p
                        keys[p] = min(d, keys.get(p, d))
                    if not packet.is_discard:
                        pts.append(p)
                if packet.pts is not None and packet.time_base is not None:
                    data_end = max(data_end, float((packet.pts + (packet.duration or 0))
                                                   * packet.time_base))
        except av.error.FFmpegError as e:
            raise MediaError(f"corrupt video {path} while reading packets: {e}") from e
        if not packets:
            raise MediaError(f"no video frames in {path}")
        if not pts:
            if untimed:
                return _decode_by_index(stream, path, packets, num_frames, fps, max_frames,
                                        start, end, threads)
            raise MediaError(f"no video frames in {path} (every packet is hidden by its "
                             f"edit list)")
        if container.duration and container.duration > 0:
            # The header's duration (mkv/webm write it at the end of muxing) against the data.
            header_end = ((container.start_time or 0) + container.duration) / 1e6
            if data_end < 0.9 * header_end and header_end - data_end > 1.0:
                raise MediaError(f"truncated video {path}: the data ends at {data_end:.2f}s, "
                                 f"the header says {header_end:.2f}s")
        pts = sorted(set(pts))
        declared = int(stream.frames or 0)
        if declared and packets < declared:
            raise MediaError(f"truncated video {path}: container declares {declared} frames, "
                             f"only {packets} present")
        first = pts[0]
        times = [float((p - first) * tb) for p in pts]
        sel = select_indices(times, num_frames=num_frames, fps=fps, max_frames=max_frames,
                             start=start, end=end)
        if not sel:
            raise MediaError(f"no frames of {path} in the segment [{start}, {end}] "
                             f"(video is {times[-1]:.3f}s long)")
        wanted = {pts[i] for i in sel}
        if not keys:  # no keyframe flags at all: start from the first frame
            keys = {pts[0]: pts[0]}
        keypts = sorted(keys)
        if threads:
            stream.thread_type = "AUTO"
        got: Dict[int, Any] = {}
        stats = {"seeks": 0, "decoded": 0, "late_seeks": 0}

        def keep(frame):
            if frame.pts in wanted and frame.pts not in got:
                got[frame.pts] = _to_display(frame, stream)

        origin = min(min(keys.values(), default=first), first)

        def seek(ki, target):
            """Seek to keyframe ``ki`` by its presentation timestamp and return (pts of the
            first frame, the frame iterator) when that first frame is at or before ``target``.
            A seek that lands late (MPEG-TS with B-frames, whose seek goes by decoding
            timestamps) retries at the keyframe's decoding timestamp, then from the keyframe
            before, then from the start of the stream."""
            tries = [keypts[ki], keys[keypts[ki]]] + ([keys[keypts[ki - 1]]] if ki else [])
            for at in list(dict.fromkeys(tries + [origin])):
                container.seek(at, stream=stream, backward=True, any_frame=False)
                stats["seeks"] += 1
                it = container.decode(stream)
                for frame in it:
                    if frame.pts is None:
                        continue
                    stats["decoded"] += 1
                    if frame.pts <= target or at == origin:
                        keep(frame)
                        return frame.pts, it
                    stats["late_seeks"] += 1
                    break
            return None, None

        frames_iter, last = None, None  # last: pts of the last frame decoded
        try:
            for target in sorted(wanted):
                if target in got:
                    continue
                ki = max(0, bisect.bisect_right(keypts, target) - 1)
                if frames_iter is None or last is None or keypts[ki] > last or last >= target:
                    last, frames_iter = seek(ki, target)
                    if target in got or frames_iter is None:
                        continue
                for frame in frames_iter:
                    if frame.pts is None:
                        continue
                    stats["decoded"] += 1
                    last = frame.pts
                    keep(frame)
                    if frame.pts >= target:
                        break
        except av.error.FFmpegError as e:
            raise MediaError(f"corrupt video {path} while decoding: {e}") from e
        fallback = len(got) < len(wanted)
        if fallback:
            # Frames the seeks missed (odd keyframe flags, broken indexes): decode forward from
            # the start of the stream.
            try:
                container.seek(origin, stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    if frame.pts is None:
                        continue
                    stats["decoded"] += 1
                    keep(frame)
                    if len(got) == len(wanted) or frame.pts > max(wanted):
                        break
            except av.error.FFmpegError as e:
                raise MediaError(f"corrupt video {path} while decoding: {e}") from e
        if len(got) < len(wanted):
            raise MediaError(f"truncated or corrupt video {path}: decoded {len(got)} of "
                             f"{len(wanted)} selected frames")
        frames = [got[pts[i]] for i in sel]
        return DecodedVideo(frames=frames, times=[times[i] for i in sel], indices=list(sel),
                            total_frames=len(pts), duration=times[-1],
                            extra={"avg_fps": float(stream.average_rate or 0),
                                   "seeks": stats["seeks"], "decoded": stats["decoded"],
                                   "late_seeks": stats["late_seeks"], "keyframes": len(keys),
                                   "fallback": fallback, "timing": "timestamps",
                                   "hidden_frames": packets - untimed - len(pts)})
    finally:
        container.close()


def _to_display(frame, stream) -> np.ndarray:
    arr = frame.to_ndarray(format="rgb24")
    arr = apply_pixel_aspect(arr, _stream_sar(stream))
    return apply_display(arr, display_transform(_display_matrix(frame, stream)))


def _decode_by_index(stream, path, packets, num_frames, fps, max_frames, start, end,
                     threads) -> DecodedVideo:
    """A stream without timestamps (a raw elementary stream): frames are counted in decoding
    output order and timed as index / the stream's declared frame rate; one forward pass."""
    import av
    rate = stream.guessed_rate or stream.average_rate or stream.base_rate
    rate = float(rate) if rate else 25.0
    times = [i / rate for i in range(packets)]
    sel = select_indices(times, num_frames=num_frames, fps=fps, max_frames=max_frames,
                         start=start, end=end)
    if not sel:
        raise MediaError(f"no frames of {path} in the segment [{start}, {end}] "
                         f"(video is {times[-1]:.3f}s long at {rate:g} fps, untimed)")
    wanted, got = set(sel), {}
    n = 0
    try:  # a raw stream cannot seek back: read it again from the start
        with av.open(path) as again:
            st = again.streams.video[0]
            if threads:
                st.thread_type = "AUTO"
            for frame in again.decode(st):
                if n in wanted:
                    got[n] = _to_display(frame, st)
                n += 1
                if n > max(wanted):
                    break
    except av.error.FFmpegError as e:
        raise MediaError(f"corrupt video {path} while decoding: {e}") from e
    if len(got) < len(wanted):
        raise MediaError(f"truncated or corrupt video {path} (no timestamps): decoded {n} "
                         f"frames, the selection needs frame {max(wanted)}")
    return DecodedVideo(frames=[got[i] for i in sel], times=[times[i] for i in sel],
                        indices=list(sel), total_frames=packets, duration=times[-1],
                        extra={"avg_fps": rate, "seeks": 0, "decoded": n, "keyframes": 0,
                               "late_seeks": 0,
                               "fallback": False, "timing": "frame index",
                               "hidden_frames": 0})


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
