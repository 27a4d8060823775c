#!/usr/bin/env python
"""Answer a prompt about a video (or images) with a LongVILA checkpoint.

  python tools/generate.py --load SAVE --video clip.mp4 --num-frames 8 --prompt "What colour is the square?"
  python tools/generate.py --load SAVE --image a.png --image b.png --prompt "..." --do-sample --temperature 0.7
  torchrun --nproc-per-node 2 tools/generate.py --load SAVE --context-parallel-size 2 --video long.mp4 --num-frames 256 --prompt "..."

Inputs are built as NVlabs/VILA builds them (evaluation/vila_inputs.py): frames straight from
the decoder (no JPEG round trip), resized by the checkpoint's ``image_aspect_ratio``, a video's
frame count from its ``num_video_frames`` unless --num-frames is given; the prompt through the
tokenizer's own chat template, tokenised as one string (--prompt-format vila, the default when
the tokenizer has a chat template; --prompt-format training: the trainer's built-in template).
--dtype bf16/fp16 runs the model in half precision (VILA's builder loads fp16). The prompt is
prefilled once and decoded against a KV cache; with several ranks the prefill is sharded by
MM-SP over the ranks (the SP group), the cache stays sharded, and every rank ends with the same
answer (rank 0 prints it).
"""

import argparse
import json
import os
import sys
import time

import torch


from megatron_longvila import cpu_compat  # noqa: E402
from megatron_longvila.evaluation import generation as G  # noqa: E402
from megatron_longvila.evaluation import runtime as R  # noqa: E402
from megatron_longvila.evaluation import vila_inputs as V  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    R.add_model_arguments(p)
    g = p.add_argument_group("input")
    g.add_argument("--video", action="append", default=[], help="a video file (repeatable)")
    g.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    g.add_argument("--num-frames", type=int, default=None,
                   help="frames sampled from each video (default: the checkpoint's "
                        "num_video_frames, else 8)")
    g.add_argument("--image-size", type=int, default=None, help="default: the vision tower's")
    g.add_argument("--image-aspect-ratio", default=None,
                   help="VILA's resize rule: resize | pad (default: the checkpoint's, else resize)")
    g.add_argument("--prompt-format", choices=("auto", "vila", "training"), default="auto",
                   help="vila: the tokenizer's chat template, whole-string tokenisation; "
                        "training: the trainer's template; auto: vila if the tokenizer has one")
    g.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
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
    if args.dtype != "fp32":
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
    tok = R.resolve_tokenizer(args)
    size = args.image_size or cfg.vision.image_size
    ratio, nvf = V.vila_media_settings(args.load)
    ratio = args.image_aspect_ratio or ratio
    frames = V.vila_frames(args.video + args.image, args.num_frames or nvf, size, ratio) \
        if (args.video or args.image) else None
    gcfg = G.GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              seed=args.sample_seed, stop_ids=G.stop_token_ids(tok))
    n = 0 if frames is None else int(frames.shape[0])
    fmt = args.prompt_format
    if fmt == "auto":
        fmt = "vila" if tok.hf is not None and V.has_chat_template(tok.hf) else "training"
    if fmt == "vila":
        if tok.hf is None or not V.has_chat_template(tok.hf):
            raise SystemExit("error: --prompt-format vila needs a transformers tokenizer with a "
                             f"chat template ({tok.name})")
        ids = V.vila_prompt_ids(tok.hf, args.prompt, n)
    else:
        ids = G.build_prompt_ids(tok, args.prompt, n)
    if frames is not None and args.dtype != "fp32":
        frames = frames.to(next(model.parameters()).dtype)
    prompt = G.expand_image_tokens(ids, model.tokens_per_frame)
    t0 = time.time()
    out = G.generate(model, prompt, frames, gcfg)
    text = G.decode_text(tok, out)
    if R.is_main_rank():
        if args.json:
            import torch.distributed as dist
            print(json.dumps({"answer": text, "token_ids": out, "prompt_tokens": prompt.shape[1],
                              "frames": n, "prompt_format": fmt, "dtype": args.dtype, "ranks": dist.get_world_size(),
                              "seconds": round(time.time() - t0, 3)}))
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
