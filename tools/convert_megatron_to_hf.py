#!/usr/bin/env python
"""Megatron-Core LongVILA checkpoint -> Hugging Face, in the layout VILA's save_pretrained writes.

  python tools/convert_megatron_to_hf.py --load ckpt/longvila-8b --save LongVILA-8B-hf

Reads SAVE/latest_checkpointed_iteration.txt (or --iteration), longvila_config.json and the dist
checkpoint (saved at any tensor-parallel size), and writes:

  SAVE/config.json        VILA's top-level config (llm_cfg, vision_tower_cfg, mm_projector_cfg,
                          mm_vision_select_layer, mm_vision_select_feature, num_video_frames, ...)
  SAVE/llm/               Qwen2ForCausalLM / LlamaForCausalLM + tokenizer (when carried)
  SAVE/vision_tower/      SiglipVisionModel + preprocessor_config.json
  SAVE/mm_projector/      the projector (layers.N.*), config with mm_projector_type

Configs, tokenizer and image-processor files and unused HF tensors carried from a converted
HF checkpoint (SAVE/hf_assets/) are written back unchanged, so HF -> Megatron -> HF is exact.
Memory: one Megatron tensor at a time is loaded at full size and streamed into the output
safetensors; peak memory does not grow with the model size.
"""

import argparse
import json
import sys

from megatron_longvila.conversion.convert import convert_megatron_to_hf, format_summary
from megatron_longvila.conversion.hf_io import ConversionError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="Megatron checkpoint directory")
    p.add_argument("--save", required=True, help="output HF (VILA layout) directory")
    p.add_argument("--iteration", default=None,
                   help="iteration to convert (default: the tracker file's), or 'release'")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                   help="dtype of the HF weights (default: the checkpoint's)")
    p.add_argument("--num-video-frames", type=int, default=None,
                   help="num_video_frames of the top-level config (default: carried, else 8)")
    p.add_argument("--tokenizer", default=None,
                   help="folder to take tokenizer files from (default: those carried)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-json", help="also write the summary to this file")
    args = p.parse_args(argv)
    it = args.iteration
    if it is not None and it != "release":
        it = int(it)

    try:
        s = convert_megatron_to_hf(args.load, args.save, dtype=args.dtype, iteration=it,
                                   num_video_frames=args.num_video_frames,
                                   tokenizer=args.tokenizer, overwrite=args.overwrite,
                                   progress=not args.no_progress)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(s))
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(s, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
