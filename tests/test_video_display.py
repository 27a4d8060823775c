"""Frames as a player shows them (issue 19): display matrix (rotations, mirrors), edit lists,
variable frame rate, non-square pixels, MPEG-TS with B-frames, raw .h264 without timestamps.

Every video is made here (PyAV where it can write the trait, else the static ffmpeg binary
of the ``imageio-ffmpeg`` wheel), each frame carrying its number as 8 bit-blocks and two
coloured corners (red top-left, green top-right). The reference is ffmpeg's own decoding of
the same file (its CLI applies the display matrix and edit lists), read back frame by frame
with the times ffmpeg presents them at."""

import fractions
import glob
import io
import json
import os
import re
import subprocess
import tarfile

import av
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from megatron_longvila.data.preprocess import preprocess
from megatron_longvila.data.video import decode_video, resize_frame

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
W, H = 64, 48


def pattern(n):
    """Frame ``n``: its number in 8 blocks along the middle (white = 1), red top-left and
    green top-right corners, so the number and the orientation read back after any turn."""
    a = np.full((H, W, 3), 60, np.uint8)
    bw = W // 8
    for b in range(8):
        if (n >> b) & 1:
            a[H // 4:3 * H // 4, b * bw:(b + 1) * bw] = 255
    a[:H // 4, :W // 4] = (255, 0, 0)
    a[:H // 4, -W // 4:] = (0, 255, 0)
    return a


def read_number(frame):
    """The number of an upright frame of any size (the blocks scale with it)."""
    h, w = frame.shape[:2]
    return sum(1 << b for b in range(8) if frame[h // 2, int((b + 0.5) * w / 8)].mean() > 158)


def upright(frame):
    """Red corner top-left, green top-right."""
    h, w = frame.shape[:2]
    tl, tr = frame[h // 10, w // 10].astype(int), frame[h // 10, w - 1 - w // 10].astype(int)
    return tl[0] > 150 and tl[1] < 100 and tr[1] > 150 and tr[0] < 100


def coded_for(frame, rotation):
    """The picture to encode so that it shows as ``frame`` under ``rotation`` = (degrees
    counter-clockwise, hflip, vflip), PyAV's ``set_display_rotation`` (turn, then mirror):
    as a phone stores a portrait clip sideways."""
    if rotation is None:
        return frame
    deg, hflip, vflip = rotation
    if hflip:
        frame = frame[:, ::-1]
    if vflip:
        frame = frame[::-1]
    return np.ascontiguousarray(np.rot90(frame, -(deg // 90)))


def write_video(path, n=20, rate=10, fmt=None, opts=None, rotation=None, pts_ms=None, sar=None):
    first = coded_for(pattern(0), rotation)
    with av.open(path, "w", format=fmt) as out:
        st = out.add_stream("libx264", rate=rate)
        st.width, st.height, st.pix_fmt = first.shape[1], first.shape[0], "yuv420p"
        st.options = dict(opts or {})
        if pts_ms is not None:
            st.time_base = st.codec_context.time_base = fractions.Fraction(1, 1000)
        if sar is not None:
            st.codec_context.sample_aspect_ratio = fractions.Fraction(sar)
        if rotation is not None:
            st.set_display_rotation(*rotation)
        for i in range(n):
            f = av.VideoFrame.from_ndarray(coded_for(pattern(i), rotation), format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = pts_ms[i], fractions.Fraction(1, 1000)
            for p in st.encode(f):
                out.mux(p)
        for p in st.encode():
            out.mux(p)
    return path


def ffmpeg_decode(path, vf=None):
    """ffmpeg's own decoding: every frame it outputs (as a player shows it) and its pts_time
    in seconds from the first frame shown."""
    d = path + ".ffmpeg"
    os.makedirs(d, exist_ok=True)
    for f in glob.glob(os.path.join(d, "*")):
        os.remove(f)
    filters = "showinfo" if vf is None else f"{vf},showinfo"
    r = subprocess.run([FFMPEG, "-nostdin", "-hide_banner", "-i", path, "-fps_mode",
                        "passthrough", "-vf", filters, os.path.join(d, "%05d.png")],
                       capture_output=True, text=True, check=True)
    times = [float(t) for t in re.findall(r"\bn:\s*\d+\s+pts:\s*-?\d+\s+pts_time:(-?[\d.]+)",
                                          r.stderr)]
    frames = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(glob.glob(d + "/*.png"))]
    assert len(frames) == len(times) > 0, r.stderr[-2000:]
    return frames, [t - times[0] for t in times]


def ffmpeg_copy(src, dst, *args, pre=()):
    subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", *pre, "-i", src, "-c", "copy",
                    *args, dst], check=True)
    return dst


def assert_same_frames(ours, ref, tol=2.0):
    for k, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, f"frame {k}: shape {a.shape}, ffmpeg shows {b.shape}"
        diff = np.abs(a.astype(int) - b.astype(int)).mean()
        assert diff < tol, f"frame {k}: mean abs difference {diff:.2f} from ffmpeg's frame"


def nearest_in_time(times, n, start=None, end=None):
    """Reference selection: n instants evenly spaced over the window; for each, the indices of
    the frames nearest to it (two when the instant falls half-way between frames)."""
    t = np.asarray(times)
    idx = np.arange(len(t))
    if start is not None:
        idx = idx[t[idx] >= start - 1e-6]
    if end is not None:
        idx = idx[t[idx] <= end + 1e-6]
    out = []
    for x in np.linspace(t[idx[0]], t[idx[-1]], n):
        d = np.abs(t[idx] - x)
        out.append([int(i) for i in idx[d <= d.min() + 1e-6]])
    return out


def check_selection(dec, ref, ref_t, want, tol=2.0):
    """``dec`` holds, in order, one of the nearest frames for each instant: same picture as
    ffmpeg's, presented at ffmpeg's time."""
    numbers = [read_number(f) for f in ref]
    chosen = []
    for k, (frame, options) in enumerate(zip(dec.frames, want)):
        got = read_number(frame)
        assert got in [numbers[i] for i in options], \
            f"frame {k} is frame number {got}, ffmpeg shows {[numbers[i] for i in options]} there"
        chosen.append(next(i for i in options if numbers[i] == got))
    assert len(dec.frames) == len(want)
    assert_same_frames(dec.frames, [ref[i] for i in chosen], tol)
    np.testing.assert_allclose(dec.times, [ref_t[i] for i in chosen], atol=1e-3)
    return chosen


@pytest.mark.parametrize("rotation", [(90, False, False), (180, False, False),
                                      (270, False, False), (90, True, False),
                                      (0, False, True)],
                         ids=["rot90", "rot180", "rot270", "rot90-hflip", "vflip"])
def test_display_matrix_turns_and_mirrors_like_ffmpeg(tmp_path, rotation):
    path = write_video(str(tmp_path / "rot.mp4"), n=6, rotation=rotation)
    ref, _ = ffmpeg_decode(path)
    assert all(upright(f) for f in ref)  # the reference itself shows the picture upright
    dec = decode_video(path, num_frames=6)
    assert_same_frames(dec.frames, ref)
    assert [read_number(f) for f in dec.frames] == list(range(6))
    assert all(upright(f) for f in dec.frames)


def test_edit_list_cut_times_and_window(tmp_path):
    """``ffmpeg -ss 1.3 -i in.mp4 -c copy``: an edit list hides the packets before the cut
    (from the keyframe at 0.0 s); they are neither counted nor timed."""
    base = write_video(str(tmp_path / "base.mp4"), n=40, opts={"bf": "3", "g": "12"})
    cut = ffmpeg_copy(base, str(tmp_path / "cut.mp4"), pre=("-ss", "1.3"))
    ref, ref_t = ffmpeg_decode(cut)
    assert read_number(ref[0]) == 13 and len(ref) == 27
    dec = decode_video(cut, num_frames=8)
    check_selection(dec, ref, ref_t, nearest_in_time(ref_t, 8))
    assert dec.total_frames == len(ref)
    dec = decode_video(cut, num_frames=3, start=1.0, end=2.0)
    check_selection(dec, ref, ref_t, nearest_in_time(ref_t, 3, 1.0, 2.0))


def test_variable_frame_rate_is_sampled_uniformly_in_time(tmp_path):
    """30 fps for 2 s, then 5 fps for 2 s: half of the frames come from each half."""
    pts = [round(i * 1000 / 30) for i in range(60)] + [2000 + 200 * i for i in range(11)]
    path = write_video(str(tmp_path / "vfr.mp4"), n=len(pts), rate=30, pts_ms=pts)
    ref, ref_t = ffmpeg_decode(path)
    assert len(ref) == len(pts)
    for n in (8, 5):
        dec = decode_video(path, num_frames=n)
        check_selection(dec, ref, ref_t, nearest_in_time(ref_t, n))
    assert sum(t < 2.0 for t in dec.times) in (2, 3)


def test_non_square_pixels_are_shown_at_their_display_aspect(tmp_path):
    """Sample aspect ratio 2:1 (anamorphic): 64x48 coded, shown 128x48."""
    path = write_video(str(tmp_path / "sar.mp4"), n=4, sar=2)
    ref, _ = ffmpeg_decode(path, vf="scale=iw*sar:ih:flags=bicubic,setsar=1")
    assert ref[0].shape == (H, 2 * W, 3)
    dec = decode_video(path, num_frames=4)
    assert_same_frames(dec.frames, ref, tol=4.0)  # PIL's bicubic against swscale's
    assert [read_number(f) for f in dec.frames] == list(range(4))


def test_mpegts_with_b_frames_seeks_to_the_right_frames(tmp_path):
    base = write_video(str(tmp_path / "base.mp4"), n=120, rate=25,
                       opts={"bf": "3", "g": "25", "keyint_min": "25", "sc_threshold": "0"})
    ts = ffmpeg_copy(base, str(tmp_path / "clip.ts"), "-bsf:v", "h264_mp4toannexb")
    ref, ref_t = ffmpeg_decode(ts)
    assert len(ref) == 120
    for n in (4, 9):
        dec = decode_video(ts, num_frames=n)
        check_selection(dec, ref, ref_t, nearest_in_time(ref_t, n))
        assert dec.extra["seeks"] > 1 and dec.extra["decoded"] < 120, dec.extra


def test_raw_h264_without_timestamps_is_decoded_by_index(tmp_path):
    path = write_video(str(tmp_path / "raw.h264"), n=30, fmt="h264",
                       opts={"bf": "2", "g": "10"})
    ref, _ = ffmpeg_decode(path)
    assert len(ref) == 30
    dec = decode_video(path, num_frames=5)
    want = np.round(np.linspace(0, 29, 5)).astype(int).tolist()
    assert dec.indices == want and dec.extra["timing"] == "frame index"
    assert_same_frames(dec.frames, [ref[i] for i in want])


def test_shards_store_the_frames_and_times_shown(tmp_path):
    """Through preprocessing: each stored frame (png, resized as configured) is ffmpeg's
    shown frame resized the same way, and ``frame_times`` are ffmpeg's presentation times."""
    media = tmp_path / "media"
    media.mkdir()
    base = write_video(str(media / "base.mp4"), n=40, opts={"bf": "3", "g": "12"})
    videos = {
        "rot.mp4": write_video(str(media / "rot.mp4"), n=12, rotation=(270, False, False)),
        "cut.mp4": ffmpeg_copy(base, str(media / "cut.mp4"), pre=("-ss", "1.3")),
        "sar.mp4": write_video(str(media / "sar.mp4"), n=12, sar=fractions.Fraction(1, 2)),
    }
    names = sorted(videos)
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(json.dumps({"video": n, "conversations": [
        {"from": "human", "value": "<video>\nWhat number?"}, {"from": "gpt", "value": "7"}]})
        + "\n" for n in names))
    out = tmp_path / "shards"
    summary = preprocess(str(ann), str(out), media_root=str(media), num_frames=4,
                         image_size=32, resize_mode="pad", image_format="png", progress=False)
    assert summary.written == 3, summary.format()
    samples = {}
    for shard in sorted(glob.glob(str(out / "*.tar"))):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, fld = m.name.split(".", 1)
                samples.setdefault(key, {})[fld] = tf.extractfile(m).read()
    for i, name in enumerate(names):
        s = samples[f"s{i:08d}"]
        meta = json.loads(s["json"])
        vf = "scale=iw*sar:ih:flags=bicubic,setsar=1" if name == "sar.mp4" else None
        ref, ref_t = ffmpeg_decode(videos[name], vf=vf)
        want = [w[0] for w in nearest_in_time(ref_t, 4)]  # no ties on these
        np.testing.assert_allclose(meta["frame_times"], [ref_t[j] for j in want], atol=1e-3)
        stored = [np.asarray(Image.open(io.BytesIO(s[f"{k:04d}.png"]))) for k in range(4)]
        assert_same_frames(stored, [resize_frame(ref[j], 32, "pad") for j in want], tol=6.0)
