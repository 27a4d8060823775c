#!/usr/bin/env python
"""Write real, PyAV-encoded videos of moving shapes (no text) and their annotations.

  python tools/make_synthetic_videos.py --out /tmp/synth --num-videos 32
  python tools/make_synthetic_videos.py --out /tmp/synth --num-videos 8 --shards --num-frames 4 --image-size 32

--shards also runs them through the real preprocessing into <out>/wds.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
    a = p.parse_args(argv)
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
