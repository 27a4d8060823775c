#!/usr/bin/env python
"""Peak memory of the converters vs model size: does conversion stream?

Builds synthetic VILA-layout HF checkpoints (random weights, written one tensor at a time)
whose language model has ONE large tensor (the embedding, --vocab x --hidden) and a growing
number of ordinary decoder layers, converts each HF -> Megatron -> HF with the real CLIs in
fresh processes, checks the round trip is exact, and prints peak RSS against model size.

  python tools/benchmarks/bench_convert.py --layers 2 16 48 --vocab 131072 --hidden 512

Peak RSS is the high-water mark (VmHWM) of the converting process (max over the TP processes
with --build-model), from the converters' own --summary-json. "over base" subtracts the
smallest model's peak, so it shows what grows with the model. --build-model measures the
HF -> Megatron path that builds the model and saves with Megatron-Core (not streaming).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_synthetic_vila(folder, layers, vocab, hidden, ffn, seed=0):
    import torch
    from transformers import Qwen2Config, SiglipVisionConfig
    from megatron_longvila.conversion.hf_io import (StreamingSafetensorsWriter,
                                                     hf_expected_shapes)
    from megatron_longvila.models.config import LanguageModelConfig, LongVILAConfig, VisionConfig
    g = torch.Generator().manual_seed(seed)
    llm = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                      tie_word_embeddings=True, rope_theta=1e6)
    llm.architectures = ["Qwen2ForCausalLM"]
    vis = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, image_size=28, patch_size=14)
    vis.architectures = ["SiglipVisionModel"]
    cfg = LongVILAConfig(
        llm=LanguageModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                                num_attention_heads=8, num_query_groups=2, ffn_hidden_size=ffn,
                                qkv_bias=True, tie_word_embeddings=True),
        vision=VisionConfig(image_size=28, patch_size=14, hidden_size=64, num_layers=2,
                            num_attention_heads=4, intermediate_size=128),
        projector_type="mlp_downsample")
    from megatron_longvila.conversion.hf_io import projector_expected_shapes
    total, largest = 0, 0
    for part, conf, shapes in (
            ("llm", llm, {k: v for k, v in hf_expected_shapes("llm", llm.to_dict()).items()
                          if k != "lm_head.weight"}),
            ("vision_tower", vis, hf_expected_shapes("vision_tower", vis.to_dict())),
            ("mm_projector", None, projector_expected_shapes(cfg))):
        d = os.path.join(folder, part)
        os.makedirs(d)
        entries = [(k, v, torch.float32) for k, v in shapes.items()]
        w = StreamingSafetensorsWriter(os.path.join(d, "model.safetensors"), entries)
        for k, shape, _ in entries:
            t = torch.randn(shape, generator=g) * 0.02
            w.write(k, t)
            total += t.numel() * 4
            largest = max(largest, t.numel() * 4)
            del t
        w.close()
        if conf is not None:
            conf.save_pretrained(d)
        else:
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({"architectures": ["MultimodalProjector"], "model_type": "v2l_projector",
                           "mm_projector_type": "mlp_downsample"}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
                   "llm_cfg": llm.to_dict(), "vision_tower_cfg": vis.to_dict(),
                   "mm_projector_cfg": {"mm_projector_type": "mlp_downsample"},
                   "hidden_size": hidden, "mm_hidden_size": 64, "mm_vision_select_layer": -2,
                   "mm_vision_select_feature": "cls_patch", "num_video_frames": 8}, f)
    return total, largest


def run_cli(args, summary):
    t = time.time()
    r = subprocess.run([sys.executable] + args + ["--no-progress", "--summary-json", summary],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    with open(summary) as f:
        s = json.load(f)
    s["wall"] = time.time() - t
    return s


def same_tensors(a, b):
    import torch
    from safetensors import safe_open
    for part in ("llm", "vision_tower", "mm_projector"):
        fa = safe_open(os.path.join(a, part, "model.safetensors"), "pt")
        fb = safe_open(os.path.join(b, part, "model.safetensors"), "pt")
        if sorted(fa.keys()) != sorted(fb.keys()):
            return False
        for k in fa.keys():  # one tensor at a time
            if not torch.equal(fa.get_tensor(k), fb.get_tensor(k)):
                return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 16, 48])
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--build-model", action="store_true",
                   help="HF -> Megatron through the built model + Megatron-Core save")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    tools = os.path.join(ROOT, "tools")
    rows = []
    try:
        for n in sorted(args.layers):
            d = os.path.join(work, f"L{n}")
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            size, largest = write_synthetic_vila(os.path.join(d, "hf"), n, args.vocab,
                                                 args.hidden, args.ffn)
            a = run_cli([os.path.join(tools, "convert_hf_to_megatron.py"), "--hf-path",
                         os.path.join(d, "hf"), "--save", os.path.join(d, "meg"),
                         "--tensor-model-parallel-size", str(args.tp), "--dtype", args.dtype]
                        + (["--build-model"] if args.build_model else []),
                        os.path.join(d, "a.json"))
            b = run_cli([os.path.join(tools, "convert_megatron_to_hf.py"), "--load",
                         os.path.join(d, "meg"), "--save", os.path.join(d, "hf2"),
                         "--dtype", args.dtype], os.path.join(d, "b.json"))
            exact = same_tensors(os.path.join(d, "hf"), os.path.join(d, "hf2"))
            rows.append((n, size, largest, a["peak_rss_bytes"], b["peak_rss_bytes"], a["wall"],
                         b["wall"], exact))
            shutil.rmtree(d, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    mib = 1 << 20
    base_a, base_b = rows[0][3], rows[0][4]
    print(f"vocab {args.vocab} x hidden {args.hidden} embedding (the large tensor), ffn {args.ffn},"
          f" {args.dtype}, TP={args.tp}, HF->Meg writer: "
          f"{'model + Megatron-Core save' if args.build_model else 'streaming'}")
    print(f"{'layers':>6} {'model':>9} {'largest':>9} | {'HF->Meg peak':>12} {'over base':>9} "
          f"{'s':>5} | {'Meg->HF peak':>12} {'over base':>9} {'s':>5} | exact")
    for n, size, largest, pa, pb, ta, tb, exact in rows:
        print(f"{n:>6} {size / mib:>7.0f}Mi {largest / mib:>7.0f}Mi | {pa / mib:>10.0f}Mi "
              f"{(pa - base_a) / mib:>7.0f}Mi {ta:>5.1f} | {pb / mib:>10.0f}Mi "
              f"{(pb - base_b) / mib:>7.0f}Mi {tb:>5.1f} | {exact}")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
