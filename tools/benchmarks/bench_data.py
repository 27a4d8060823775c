#!/usr/bin/env python
"""Data pipeline benchmark (not a test): preprocessing videos/s and loader frames/s, against a
plain PyAV decode loop of the same videos. Prints a table.

  python tools/benchmarks/bench_data.py                 # defaults: 24 videos, 320x240, 20-30 s @ 24 fps
  python tools/benchmarks/bench_data.py --num-videos 8 --seconds 4   # quicker

Columns: wall-clock videos/s and frames/s (frames decoded, kept or delivered), and CPU
milliseconds per video (this process plus its worker processes) which shared, busy machines
distort less than wall time.

Rows:
  pyav decode (baseline)   every frame decoded to RGB with PyAV, one process: the floor cost of
                           touching the videos at all
  pyav decode + select     the same loop keeping only the N uniformly spaced frames, resized
  preprocess, W workers    tools/preprocess_videos.py's path: two-pass PyAV decode, resize, JPEG,
                           shards (W worker processes)
  loader, W workers        build_train_loader over those shards: read tar, tokenise, pack,
                           JPEG decode, normalise to float32 (frames/s delivered in micro-batches)
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time


import av  # noqa: E402
import numpy as np  # noqa: E402

from megatron_longvila.data import build_train_loader  # noqa: E402
from megatron_longvila.data.preprocess import preprocess  # noqa: E402
from megatron_longvila.data.synthetic import make_synthetic_videos  # noqa: E402
from megatron_longvila.data.video import resize_frame  # noqa: E402


def cpu_seconds():
    """User + system CPU of this process and of its children that have been waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def pyav_decode_all(paths, rgb=True):
    frames = 0
    for p in paths:
        with av.open(p) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            for f in c.decode(s):
                if rgb:
                    f.to_ndarray(format="rgb24")
                frames += 1
    return frames


def pyav_decode_select(paths, n, size):
    kept = 0
    for p in paths:
        with av.open(p) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            total = s.frames
            want = set(np.round(np.linspace(0, total - 1, n)).astype(int).tolist())
            for i, f in enumerate(c.decode(s)):
                if i in want:
                    resize_frame(f.to_ndarray(format="rgb24"), size)
                    kept += 1
    return kept


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-videos", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--fps", type=int, default=24)
    ap.add_argument("--gop", type=int, default=48, help="keyframe interval of the test videos (frames)")
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--num-frames", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--tokens-per-frame", type=int, default=196)
    ap.add_argument("--loader-batches", type=int, default=60)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--keep", default=None, help="keep the data in this directory")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time each row this many times and keep the fastest (shared machines)")
    a = ap.parse_args()
    workers = [int(w) for w in a.workers.split(",")]
    root = a.keep or tempfile.mkdtemp(prefix="bench_data_")
    rows = []
    try:
        t = time.perf_counter()
        nfr = int(a.seconds * a.fps)
        ann = make_synthetic_videos(os.path.join(root, "raw"), num_videos=a.num_videos,
                                    frames_per_video=nfr, width=a.width, height=a.height,
                                    fps=a.fps, seed=0, gop_size=a.gop)
        # frames_per_video gets up to +50% random extra length per video
        paths = sorted(os.path.join(root, "raw", "videos", f) for f in os.listdir(os.path.join(root, "raw", "videos")))
        mb = sum(os.path.getsize(p) for p in paths) / 1e6
        print(f"# {len(paths)} synthetic h264 mp4 videos, {a.width}x{a.height}, ~{a.seconds:g}-"
              f"{a.seconds * 1.5:g} s at {a.fps} fps, keyframe every {a.gop} frames, {mb:.1f} MB (made in {time.perf_counter() - t:.1f} s); "
              f"{a.num_frames} frames/video -> {a.image_size}px; cpus={os.cpu_count()}", flush=True)

        pyav_decode_all(paths[:2])  # warm-up

        def best(fn):
            """Fastest of --repeat runs: (wall s, CPU s of this process + reaped children, result)."""
            out = None
            for _ in range(max(1, a.repeat)):
                c, t = cpu_seconds(), time.perf_counter()
                r = fn()
                dt, dc = time.perf_counter() - t, cpu_seconds() - c
                if out is None or dt < out[0]:
                    out = (dt, dc, r)
            return out

        nv = len(paths)
        for rgb in (False, True):
            dt, dc, fr = best(lambda: pyav_decode_all(paths, rgb))
            rows.append((f"baseline: pyav decode all frames{' + to RGB' if rgb else ''}",
                         nv / dt, fr / dt, 1e3 * dc / nv, f"{fr} frames decoded"))
        dt, dc, kept = best(lambda: pyav_decode_select(paths, a.num_frames, a.image_size))
        rows.append((f"pyav decode + keep {a.num_frames} + resize", nv / dt, kept / dt,
                     1e3 * dc / nv, f"{kept} frames kept"))
        out = None
        for w in workers:
            out = os.path.join(root, f"wds_w{w}")
            dt, dc, s = best(lambda: preprocess(ann, out, num_frames=a.num_frames,
                                                image_size=a.image_size, num_workers=w,
                                                progress=False, overwrite=True,
                                                shard_max_samples=8))
            rows.append((f"preprocess -> shards, {w} worker(s)", s.written / dt, s.frames / dt,
                         1e3 * dc / s.written, f"{s.bytes / 1e6:.1f} MB in {len(s.shards)} shards"))
        seq = (a.num_frames * a.tokens_per_frame + 200) * 2
        for w in [0] + [x for x in workers if x > 0]:
            def run():
                """Wall time of --loader-batches micro-batches after the first (start-up); CPU
                over the loader's whole life (workers included once they are joined)."""
                c0 = cpu_seconds()
                loader = build_train_loader(out, "tiny", seq_length=seq, micro_batch_size=1,
                                            tokens_per_frame=a.tokens_per_frame,
                                            image_size=a.image_size, num_workers=w, seed=0)
                first = next(loader)
                t = time.perf_counter()
                frames = samples = toks = 0
                for _ in range(a.loader_batches):
                    bt = next(loader)
                    frames += bt["frames"].shape[0]
                    samples += bt["num_samples"]
                    toks += bt["tokens"].shape[1]
                dt = time.perf_counter() - t
                loader.close()
                cpu_per_sample = (cpu_seconds() - c0) / (samples + first["num_samples"])
                return dt, frames, samples, toks, cpu_per_sample
            res = [run() for _ in range(max(1, a.repeat))]
            dt, frames, samples, toks, cps = min(res, key=lambda r: r[0])
            rows.append((f"loader, {w} worker(s), seq {seq}", samples / dt, frames / dt, 1e3 * cps,
                         f"{a.loader_batches / dt:.1f} micro-batches/s, {toks / dt / 1e3:.0f}k tokens/s"))
        print()
        print(f"| {'what':<44} | {'videos/s':>9} | {'frames/s':>9} | {'CPU ms/video':>12} | notes")
        print(f"|{'-' * 46}|{'-' * 11}|{'-' * 11}|{'-' * 14}|------")
        for name, vps, fps, cpu, note in rows:
            print(f"| {name:<44} | {vps:9.1f} | {fps:9.1f} | {cpu:12.1f} | {note}")
        la = os.getloadavg()
        print(f"\nload average at the end: {la[0]:.1f} {la[1]:.1f} {la[2]:.1f} (wall-clock rates "
              f"are only comparable on an otherwise idle machine; CPU ms/video is less sensitive)")
    finally:
        if a.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
