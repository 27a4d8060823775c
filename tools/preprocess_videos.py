#!/usr/bin/env python
"""Videos (mp4/webm/mkv, or jpg/png images as one-frame videos) + an annotation file (JSON list
or JSONL, LLaVA/VILA conversations) -> WebDataset shards with megatron-energon metadata.

  python tools/preprocess_videos.py --annotations ann.json --media-root videos/ --out shards/ \
      --num-frames 8 --image-size 384 --workers 8

Bad entries (missing, empty, unreadable or truncated media; malformed annotations) are skipped
and listed with their reason at the end; --strict stops at the first one instead (exit code 2).
"""

import argparse
import logging
import os
import sys


from megatron_longvila.data.preprocess import PreprocessConfig, PreprocessError, preprocess  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="JSON list or JSONL of entries")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--media-root", default=None,
                   help="directory that relative media paths start from (default: the annotation file's)")
    p.add_argument("--num-frames", type=int, default=8, help="frames sampled uniformly per video")
    p.add_argument("--fps", type=float, default=None, help="sample at this rate instead of --num-frames")
    p.add_argument("--max-frames", type=int, default=None, help="cap on frames (with --fps)")
    p.add_argument("--image-size", type=int, default=384, help="square size of the vision encoder")
    p.add_argument("--resize-mode", choices=["crop", "resize", "pad"], default="resize",
                   help="resize (default: VILA's for SigLIP towers), pad, or crop")
    p.add_argument("--image-format", choices=["jpg", "png"], default="jpg")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--shard-max-bytes", type=float, default=1 << 30)
    p.add_argument("--shard-max-samples", type=int, default=10000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--strict", action="store_true", help="stop at the first bad entry")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--key-prefix", default="s")
    p.add_argument("--allow-media-outside-root", action="store_true",
                   help="read media paths that leave --media-root (../, absolute, symlinks), "
                        "with a warning; refused by default")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    cfg = PreprocessConfig(num_frames=a.num_frames, fps=a.fps, max_frames=a.max_frames,
                           image_size=a.image_size, resize_mode=a.resize_mode,
                           image_format=a.image_format, jpeg_quality=a.jpeg_quality,
                           shard_max_bytes=int(a.shard_max_bytes),
                           shard_max_samples=a.shard_max_samples, num_workers=a.workers,
                           strict=a.strict, key_prefix=a.key_prefix, progress=not a.no_progress,
                           overwrite=a.overwrite,
                           allow_outside_media_root=a.allow_media_outside_root)
    try:
        summary = preprocess(a.annotations, a.out, media_root=a.media_root, config=cfg)
    except PreprocessError as e:
        print(f"error{' (--strict)' if a.strict else ''}: {e}", file=sys.stderr)
        return 2
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
