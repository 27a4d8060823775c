#!/usr/bin/env python
"""Hugging Face LongVILA/VILA checkpoint -> Megatron-Core dist checkpoint (what
``pretrain_longvila.py --load`` reads).

  # a VILA/LongVILA checkpoint (llm/, vision_tower/, mm_projector/, config.json)
  python tools/convert_hf_to_megatron.py --hf-path LongVILA-8B --save ckpt/longvila-8b \
      --tensor-model-parallel-size 2

  # stage 1: a plain language model + a plain SigLIP tower; the projector starts fresh
  python tools/convert_hf_to_megatron.py --llm-path Qwen2-7B-Instruct \
      --vision-path siglip-so400m-patch14-384 --projector-type mlp_downsample --save ckpt/stage0

Output: SAVE/latest_checkpointed_iteration.txt ("release"), SAVE/release/ (the dist
checkpoint), SAVE/longvila_config.json, SAVE/hf_assets/ (HF configs, tokenizer and image
processor files, HF tensors LongVILAModel does not use; for convert_megatron_to_hf.py).

The dist checkpoint stores tensors in full (model) coordinates, so it loads at any tensor
parallel size (Megatron-Core reshards on load); --tensor-model-parallel-size is checked against
the shapes (heads, groups, vocab, ffn must divide). Memory: by default one process streams
one tensor at a time (read HF tensor(s) -> map -> write), so peak memory is about the largest
tensor, not the model. --build-model instead builds the TP-sharded model in N processes and
saves it with Megatron-Core's own save (the model is held once, spread over the processes). Bad input (missing file, tensor or key; shape or
architecture mismatch) stops with an error naming it, before anything is written, and no
partial output is left behind (exit code 2).
"""

import argparse
import json
import sys

from megatron_longvila.conversion.convert import convert_hf_to_megatron, format_summary
from megatron_longvila.conversion.hf_io import ConversionError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("source (a VILA checkpoint, or plain model folders)")
    src.add_argument("--hf-path", help="VILA layout folder, or a plain Qwen2/Llama or SigLIP folder")
    src.add_argument("--llm-path", help="a plain Qwen2ForCausalLM / LlamaForCausalLM folder")
    src.add_argument("--vision-path", help="a plain SiglipVisionModel folder")
    src.add_argument("--projector-type", default=None,
                     choices=["mlp_downsample", "mlp_downsample_2x2_fix", "linear", "mlp2x_gelu"],
                     help="projector when the source has none (default mlp_downsample)")
    src.add_argument("--vision-select-layer", type=int, default=None,
                     help="mm_vision_select_layer when the source has none (default -2)")
    p.add_argument("--save", required=True, help="output Megatron checkpoint directory")
    p.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1,
                   dest="tensor_model_parallel_size")
    p.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default=None,
                   help="dtype of the Megatron weights (default: the source's; fp32 if it "
                        "mixes 16-bit types)")
    p.add_argument("--build-model", action="store_true",
                   help="build the TP-sharded model in --tensor-model-parallel-size processes and "
                        "save it with Megatron-Core's dist_checkpointing.save (memory: the whole "
                        "model, spread over the processes) instead of the streaming writer")
    p.add_argument("--seed", type=int, default=1234, help="seed of a freshly initialised projector")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --save")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--summary-json", help="also write the summary to this file")
    args = p.parse_args(argv)
    if not (args.hf_path or args.llm_path):
        p.error("give --hf-path, or --llm-path and --vision-path")

    try:
        s = convert_hf_to_megatron(
            args.save, hf_path=args.hf_path, llm_path=args.llm_path, vision_path=args.vision_path,
            tensor_parallel_size=args.tensor_model_parallel_size, dtype=args.dtype,
            projector_type=args.projector_type, vision_select_layer=args.vision_select_layer,
            seed=args.seed, overwrite=args.overwrite,
            in_process=args.tensor_model_parallel_size == 1, progress=not args.no_progress,
            build_model=args.build_model)
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
