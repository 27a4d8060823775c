#!/usr/bin/env python
"""Does upstream VILA run what we export the way we do? (issue 20)

  VILA_SRC=/work/vila-src VILA_VENV=/work/vila-venv python tools/vila_check/check_upstream.py

(tools/vila_check/README.md: the one command that also sets up VILA's venv.) Steps, each
through the user-facing tools:

1. a tiny VILA-layout checkpoint saved by transformers 5 (SigLIP tensors without the
   ``vision_model.`` prefix, RoPE only as ``rope_parameters``), with a chat-template
   tokenizer, an image and a short video;
2. HF -> Megatron (tools/convert_hf_to_megatron.py);
3. a stage-4-like fine-tune with a NEW RoPE base (pretrain_longvila.py --stage
   context-extension --rotary-base ...), a few steps;
4. Megatron -> HF (tools/convert_megatron_to_hf.py);
5. VILA's own code (vila_side.py, in VILA's venv, transformers 4.46) loads the export and
   computes, for an image prompt and a video prompt, the logits of every position and greedy
   tokens;
6. our model (the Megatron checkpoint of step 3, inputs built by evaluation/vila_inputs.py:
   frames straight from our decoder, the tokenizer's chat template) computes the same.
It prints the max abs logit difference (fp32) per prompt and whether the greedy tokens agree,
and exits non-zero when a difference is >= --tol or the tokens differ.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHATML = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
          "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, env=None, python=sys.executable):
    log("+ " + " ".join(cmd))
    r = subprocess.run([python] + cmd, cwd=REPO, env={**os.environ, **(env or {})},
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-4000:] + r.stderr[-6000:])
        raise SystemExit(f"error: step failed (exit {r.returncode}): {' '.join(cmd[:2])}")
    return r.stdout


# --------------------------------------------------------------------------- step 1
def build_source(d, args):
    """The VILA layout (llm/, vision_tower/, mm_projector/, config.json), as transformers 5
    saves it; our MultimodalProjector's layout for the projector."""
    from safetensors.torch import save_file
    from transformers import (Qwen2Config, Qwen2ForCausalLM, SiglipImageProcessor,
                              SiglipVisionConfig, SiglipVisionModel)

    from megatron_longvila.data.tokenizer import make_tiny_hf_tokenizer
    from megatron_longvila.models.projector import MultimodalProjector
    torch.manual_seed(args.seed)
    tok = make_tiny_hf_tokenizer()
    tok.chat_template = CHATML
    # VILA's builder resizes the LLM's vocabulary to its tokenizer's length, which adds
    # <vila/sentinel>, <image>, <vila/video>: a vocabulary of that size is kept whole.
    lconf = Qwen2Config(vocab_size=len(tok) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=args.base,
                        max_position_embeddings=4096, rms_norm_eps=1e-6,
                        tie_word_embeddings=False, initializer_range=0.1)
    lconf.architectures = ["Qwen2ForCausalLM"]
    lm = Qwen2ForCausalLM(lconf)
    lm.save_pretrained(os.path.join(d, "llm"))
    tok.save_pretrained(os.path.join(d, "llm"))
    s = args.image_size
    vconf = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, image_size=s, patch_size=4,
                               layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
    vconf.architectures = ["SiglipVisionModel"]
    vt = SiglipVisionModel(vconf)
    vt.save_pretrained(os.path.join(d, "vision_tower"))
    SiglipImageProcessor(size={"height": s, "width": s}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(os.path.join(d, "vision_tower"))
    proj = MultimodalProjector("mlp_downsample", 32, 64, args.token_order)
    for prm in proj.parameters():
        torch.nn.init.normal_(prm, std=0.2)
    pdir = os.path.join(d, "mm_projector")
    os.makedirs(pdir)
    pconf = {"architectures": ["MultimodalProjector"], "mm_projector_type": "mlp_downsample",
             "model_type": "v2l_projector", "token_order": args.token_order}
    with open(os.path.join(pdir, "config.json"), "w") as f:
        json.dump(pconf, f)
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()},
              os.path.join(pdir, "model.safetensors"), metadata={"format": "pt"})
    top = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
           "llm_cfg": lm.config.to_dict(), "vision_tower_cfg": vt.config.to_dict(),
           "mm_projector_cfg": pconf, "hidden_size": 64, "mm_hidden_size": 32,
           "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
           "num_video_frames": args.num_video_frames, "image_aspect_ratio": "resize",
           "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
           "model_dtype": "torch.float32"}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(top, f)


def make_media(d, args):
    """A PNG image and a lossless RGB video (decoded bit-exactly by PyAV and OpenCV), both of
    another size than the tower's, so the aspect-ratio resize is exercised."""
    import av
    from PIL import Image
    rng = np.random.default_rng(args.seed)
    w, h = 45, 37
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(d, "image.png"))
    path = os.path.join(d, "video.mkv")
    with av.open(path, "w") as c:
        st = c.add_stream("ffv1", rate=4)
        st.width, st.height, st.pix_fmt = w, h, "bgr0"
        for i in range(args.video_frames):
            yy, xx = np.mgrid[0:h, 0:w]
            f = np.stack([(xx * 5 + i * 20) % 256, (yy * 7 + i * 9) % 256,
                          rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)
    return os.path.join(d, "image.png"), path


# --------------------------------------------------------------------------- step 6
def our_side(meg, out, image, video, question, max_new_tokens):
    """Logits (every position) and greedy tokens of our model for both prompts."""
    from transformers import AutoTokenizer

    from megatron_longvila import cpu_compat
    from megatron_longvila.evaluation import generation as G
    from megatron_longvila.evaluation import vila_inputs as V
    from megatron_longvila.evaluation.runtime import init_distributed
    from megatron_longvila.models import LongVILAModel
    from megatron_longvila.checkpoint import load_model_weights, read_checkpoint_config
    init_distributed()
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    cfg = read_checkpoint_config(meg)
    cpu_compat.model_parallel_seed(0)
    model = LongVILAModel(cfg).eval()
    load_model_weights(model, meg)
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "llm"))
    ratio, nvf = V.vila_media_settings(out)
    res = {}
    for kind, path in (("image", image), ("video", video)):
        frames = V.vila_frames([path], nvf, cfg.vision.image_size, ratio)
        ids = V.vila_prompt_ids(tok, question, int(frames.shape[0]))
        prompt = G.expand_image_tokens(ids, model.tokens_per_frame)
        S = prompt.shape[1]
        with torch.no_grad():
            logits = model(prompt, torch.arange(S)[None], frames, parallel_output=False).output[0]
        gen = G.generate(model, prompt, frames, G.GenerationConfig(
            max_new_tokens=max_new_tokens, stop_ids=[]))
        res[kind] = {"logits": logits.float(), "pixels": frames, "greedy": gen, "ids": ids}
    return cfg, res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vila-src", default=os.environ.get("VILA_SRC", "/work/vila-src"),
                   help="NVlabs/VILA source tree (its llava/ package is imported from there)")
    p.add_argument("--vila-venv", default=os.environ.get("VILA_VENV", "/work/vila-venv"))
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--base", type=float, default=10000.0, help="RoPE base of the source")
    p.add_argument("--new-base", type=float, default=250000.0, help="stage-4 RoPE base")
    p.add_argument("--token-order", choices=("row_major", "column_major"), default="row_major",
                   help="projector merge order (VILA HEAD reads mlp_downsample as row_major)")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--num-video-frames", type=int, default=4)
    p.add_argument("--video-frames", type=int, default=10, help="frames in the video file")
    p.add_argument("--train-iters", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--question", default="What happens in it?")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    vpy = os.path.join(args.vila_venv, "bin", "python")
    for path, what in ((vpy, "VILA venv python"), (os.path.join(args.vila_src, "llava"),
                                                   "VILA source (llava/)")):
        if not os.path.exists(path):
            raise SystemExit(f"error: {what} not found at {path} (tools/vila_check/README.md)")
    work = args.work or tempfile.mkdtemp(prefix="vila_check_")
    os.makedirs(work, exist_ok=True)
    hf, meg, meg4, out = (os.path.join(work, n) for n in ("hf", "meg", "meg_stage4", "export"))
    for d in (hf, meg, meg4, out):
        if os.path.exists(d):
            raise SystemExit(f"error: {d} exists; pass an empty --work")
    env = {"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

    log(f"1. tiny VILA checkpoint (transformers 5 layout) in {hf}")
    os.makedirs(hf)
    build_source(hf, args)
    image, video = make_media(work, args)
    log("2. HF -> Megatron")
    run(["tools/convert_hf_to_megatron.py", "--hf-path", hf, "--save", meg, "--dtype", "fp32",
         "--no-progress"], env)
    log(f"3. stage-4-like fine-tune, RoPE base {args.base:g} -> {args.new_base:g}")
    run(["pretrain_longvila.py", "--model", "tiny", "--stage", "context-extension",
         "--load", meg, "--finetune", "--save", meg4, "--tokenizer-model",
         os.path.join(hf, "llm"), "--seq-length", "128", "--global-batch-size", "2",
         "--micro-batch-size", "1", "--train-iters", str(args.train_iters), "--lr", "1e-3",
         "--lr-warmup-iters", "1", "--rotary-base", str(args.new_base),
         "--synthetic-text-only", "--synthetic-dir", os.path.join(work, "data"),
         "--num-workers", "0", "--log-interval", "1"], env)
    log("4. Megatron -> HF")
    run(["tools/convert_megatron_to_hf.py", "--load", meg4, "--save", out, "--dtype", "fp32",
         "--tokenizer", os.path.join(hf, "llm"), "--num-video-frames",
         str(args.num_video_frames), "--no-progress"], env)
    log("5. VILA's code (transformers 4.46) on the export")
    stdout = run([os.path.join(REPO, "tools", "vila_check", "vila_side.py"), "--model", out,
                  "--image", image, "--video", video, "--question", args.question,
                  "--max-new-tokens", str(args.max_new_tokens),
                  "--out", os.path.join(work, "vila")],
                 env={"PYTHONPATH": args.vila_src, "OMP_NUM_THREADS": "1",
                      "PYTHONWARNINGS": "ignore"}, python=vpy)
    with open(os.path.join(work, "vila.json")) as f:
        vila = json.load(f)
    from safetensors.torch import load_file
    vt = load_file(os.path.join(work, "vila.safetensors"))
    log("6. our model on the same inputs")
    cfg, ours = our_side(meg4, out, image, video, args.question, args.max_new_tokens)

    ok = True
    summary = {"vila": {k: vila[k] for k in ("transformers", "torch", "rope_theta", "vocab",
                                             "image_aspect_ratio", "num_video_frames",
                                             "from_pretrained")},
               "our_rope_base": cfg.llm.rope_base, "token_order": cfg.projector_token_order}
    if vila["weights_not_loaded_warnings"]:
        ok = False
        summary["weights_not_loaded"] = vila["weights_not_loaded_warnings"]
    if args.new_base not in (vila["rope_theta"], vila["from_pretrained"]["rope_theta"]) or \
            vila["rope_theta"] != vila["from_pretrained"]["rope_theta"] or \
            cfg.llm.rope_base != args.new_base:
        ok = False
    for kind in ("image", "video"):
        o, v = ours[kind], vila["prompts"][kind]
        vl, vp = vt[f"{kind}.logits"], vt[f"{kind}.pixels"]
        r = {"frames": [int(o["pixels"].shape[0]), v["frames"]],
             "positions": [int(o["logits"].shape[0]), v["positions"]]}
        if o["pixels"].shape == vp.shape:
            r["pixels_max_abs_diff"] = float((o["pixels"] - vp).abs().max())
        if o["logits"].shape == vl.shape:
            r["logits_max_abs_diff"] = float((o["logits"] - vl).abs().max())
            r["logits_max_abs"] = float(vl.abs().max())
        else:
            ok = False
        r["greedy_ours"], r["greedy_vila"] = o["greedy"], v["greedy"]
        r["greedy_equal"] = o["greedy"] == v["greedy"]
        ok = ok and r.get("logits_max_abs_diff", 1.0) < args.tol and r["greedy_equal"]
        summary[kind] = r
    summary["ok"] = ok
    print(json.dumps(summary, indent=1))
    log(("PASS" if ok else "FAIL") + f" (tolerance {args.tol:g}); work folder {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
