#!/usr/bin/env python
"""Write real, PyAV-encoded videos of moving shapes (no text) and their annotations.

  python tools/make_synthetic_videos.py --out /tmp/synth --num-videos 32
  python tools/make_synthetic_videos.py --out /tmp/synth --num-videos 8 --shards --num-frames 4 --image-size 32

--shards also runs them through the real preprocessing into <out>/wds.
--needle: the needle-in-a-haystack task instead (megatron_longvila/evaluation/needle_data.py):
grey videos of --min-frames..--frames-per-video frames with one coloured-square frame; with
--shards, preprocessed keeping every frame; --needle-eval-set also writes a held-out haystack
video and needle images (<out>/eval/needles.json) for tools/eval_needle.py.
"""

import argparse
import os
import sys


from megatron_longvila.data.synthetic import make_synthetic_dataset, make_synthetic_videos  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--num-videos", type=int, default=16)
    p.add_argument("--frames-per-video", type=int, default=24)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=48)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--formats", default="mp4", help="comma list of mp4,webm,mkv")
    p.add_argument("--text-only", type=int, default=0, help="extra text-only entries")
    p.add_argument("--shards", action="store_true", help="also write shards to <out>/wds")
    p.add_argument("--num-frames", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--needle", action="store_true", help="the needle task (see above)")
    p.add_argument("--min-frames", type=int, default=1, help="--needle: fewest frames per video")
    p.add_argument("--needle-eval-set", action="store_true", help="--needle: also the eval set")
    a = p.parse_args(argv)
    if a.needle:
        from megatron_longvila.evaluation import needle_data as nd
        span = (a.min_frames, a.frames_per_video)
        if a.shards:
            print(f"dataset: {nd.make_needle_dataset(a.out, a.num_videos, span, a.width, a.image_size, a.seed)}")
        else:
            print(f"annotations: {nd.make_needle_videos(a.out, a.num_videos, span, a.width, a.seed)}")
        if a.needle_eval_set:
            print(f"needles: {nd.make_needle_eval_set(os.path.join(a.out, 'eval'), size=a.width, seed=a.seed + 10_000)}")
        return 0
    if a.shards:
        path = make_synthetic_dataset(a.out, num_videos=a.num_videos, num_frames=a.num_frames,
                                      image_size=a.image_size, seed=a.seed,
                                      num_text_only=a.text_only,
                                      frames_per_video=a.frames_per_video)
        print(f"dataset: {path}")
        return 0
    exts = tuple("." + e.strip().lstrip(".") for e in a.formats.split(","))
    ann = make_synthetic_videos(a.out, num_videos=a.num_videos, frames_per_video=a.frames_per_video,
                                width=a.width, height=a.height, fps=a.fps, seed=a.seed,
                                extensions=exts, num_text_only=a.text_only)
    print(f"annotations: {ann}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
