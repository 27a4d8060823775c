#!/usr/bin/env python
"""Answer a prompt about a video (or images) with a LongVILA checkpoint.

  python tools/generate.py --load SAVE --video clip.mp4 --num-frames 8 --prompt "What colour is the square?"
  python tools/generate.py --load SAVE --image a.png --image b.png --prompt "..." --do-sample --temperature 0.7
  torchrun --nproc-per-node 2 tools/generate.py --load SAVE --context-parallel-size 2 --video long.mp4 --num-frames 256 --prompt "..."

Frames go through the preprocessing steps (uniform sampling, resize, JPEG round trip, SigLIP
normalisation) and the prompt through the training chat template, so a checkpoint sees what it
was trained on. The prompt is prefilled once and decoded against a KV cache; with several
ranks the prefill is sharded by MM-SP over the ranks (the SP group), the cache stays sharded,
and every rank ends with the same answer (rank 0 prints it).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_longvila import cpu_compat  # noqa: E402
from megatron_longvila.evaluation import generation as G  # noqa: E402
from megatron_longvila.evaluation import runtime as R  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_model_arguments(p)
    g = p.add_argument_group("input")
    g.add_argument("--video", action="append", default=[], help="a video file (repeatable)")
    g.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    g.add_argument("--num-frames", type=int, default=8, help="frames sampled from each video")
    g.add_argument("--image-size", type=int, default=None, help="default: the vision tower's")
    g.add_argument("--prompt", required=True)
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--sample-seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print a JSON record instead of the text")
    return p


def main(argv=None):
    cpu_compat.enable()  # an entry point: the CPU shims (no-op with CUDA)
    args = build_parser().parse_args(argv)
    model, cfg = R.setup_model(args)
    tok = R.resolve_tokenizer(args)
    size = args.image_size or cfg.vision.image_size
    frames = G.load_media(args.video + args.image, args.num_frames, size) \
        if (args.video or args.image) else None
    gcfg = G.GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.sample_seed, stop_ids=G.stop_token_ids(tok))
    n = 0 if frames is None else int(frames.shape[0])
    ids = G.build_prompt_ids(tok, args.prompt, n)
    prompt = G.expand_image_tokens(ids, model.tokens_per_frame)
    t0 = time.time()
    out = G.generate(model, prompt, frames, gcfg)
    text = G.decode_text(tok, out)
    if R.is_main_rank():
        if args.json:
            import torch.distributed as dist
            print(json.dumps({"answer": text, "token_ids": out, "prompt_tokens": prompt.shape[1],
                              "frames": n, "ranks": dist.get_world_size(),
                              "seconds": round(time.time() - t0, 3)}))
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
