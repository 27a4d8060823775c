"""GPU check, rows 10-12: fp16 with loss scaling; HF -> Megatron -> HF at real qwen2-1.5b and
SigLIP so400m widths with the converted model's bf16 logits against transformers' on the GPU;
the README's first command on the GPU."""

import json
import math
import os
import re
import sys

import pytest
import torch

from gpucheck import LLM_LAYERS, PRESET, record, records, remove, run, trainer, work_dir

pytestmark = pytest.mark.gpu


FP16_ITERS = 40


@pytest.mark.timeout(240)
def test_fp16_with_loss_scaling():
    """fp16 with Megatron's dynamic loss scaler (initial scale 2^16, hysteresis 2): overflowing
    iterations are skipped while the scale backs off, then the updates go through and the loss
    falls. (The per-token loss is a sum over the global batch's tokens, so its gradients start
    far above fp16's range at 2^16: the first iterations overflow by design.)"""
    w = work_dir("fp16")
    m = os.path.join(w, "fp16.jsonl")
    remove(m)
    _, out, dt = trainer(["--model", PRESET, "--num-layers", LLM_LAYERS, "--stage", "sft",
                          "--fp16", "--use-distributed-optimizer", "--seq-length", 4096,
                          "--global-batch-size", 2, "--train-iters", FP16_ITERS, "--lr", 1e-4,
                          "--lr-warmup-iters", 1, "--metrics-file", m, "--log-interval", 5,
                          "--synthetic-videos", 16, "--synthetic-frames", 8,
                          "--num-workers", 2, "--seed", 4], 230, os.path.join(w, "fp16.log"))
    recs = records(m)
    assert [r["iteration"] for r in recs] == list(range(1, FP16_ITERS + 1))
    stepped = [r["iteration"] for r in recs if math.isfinite(r["grad_norm"] or float("nan"))]
    skipped = FP16_ITERS - len(stepped)
    record("fp16 + dynamic loss scaling", seconds=round(dt, 1), iterations=FP16_ITERS,
           skipped_by_scaler=skipped, first_update_at=stepped[0] if stepped else None,
           loss_first=round(recs[0]["loss"], 4), loss_last=round(recs[-1]["loss"], 4),
           note="skips = overflow while the scale backs off from 2^16")
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert len(stepped) >= 5 and stepped[-1] == FP16_ITERS, (skipped, stepped)
    assert recs[-1]["loss"] < recs[0]["loss"]


# ------------------------------------------------------------------ HF <-> Megatron, real widths

VISION_LAYERS = 27  # all of so400m's


def _real_width_config():
    import dataclasses

    from megatron_longvila.models.config import get_preset
    cfg = get_preset(PRESET)
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=LLM_LAYERS))


@torch.no_grad()
def _hf_logits(lm, vt, proj, cfg, tokens, frames):
    from megatron_longvila.constants import IMAGE_TOKEN_INDEX
    hs = vt(pixel_values=frames, output_hidden_states=True).hidden_states
    visual = proj(hs[cfg.vision_select_layer]).reshape(-1, cfg.llm.hidden_size)
    vis = tokens == IMAGE_TOKEN_INDEX
    emb = lm.get_input_embeddings()(tokens.masked_fill(vis, 0))
    emb[vis] = visual.to(emb.dtype)
    pos = torch.arange(tokens.numel(), device=tokens.device)[None]
    return lm(inputs_embeds=emb[None], position_ids=pos).logits[0].float()


@pytest.mark.timeout(400)
def test_hf_megatron_hf_real_widths_logits_on_gpu():
    from safetensors.torch import load_file

    from megatron_longvila.constants import IMAGE_TOKEN_INDEX
    from modelutil import hf_modules
    from test_convert import write_vila
    w = work_dir("convert")
    for d in ("hf", "meg", "hf2"):
        remove(os.path.join(w, d))
    cfg = _real_width_config()
    lm, vt, proj = hf_modules(cfg, seed=3)
    lm, vt, proj = lm.to(torch.bfloat16), vt.to(torch.bfloat16), proj.to(torch.bfloat16)
    hf = write_vila(os.path.join(w, "hf"), cfg, lm, vt, proj)
    _, _, t1 = run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-path", hf,
                    "--save", os.path.join(w, "meg"), "--dtype", "bf16", "--no-progress"], 200,
                   os.path.join(w, "to_megatron.log"))
    _, _, t2 = run([sys.executable, "tools/convert_megatron_to_hf.py", "--load",
                    os.path.join(w, "meg"), "--save", os.path.join(w, "hf2"), "--dtype", "bf16",
                    "--no-progress"], 200, os.path.join(w, "to_hf.log"))
    n_tensors = 0
    for part in ("llm", "vision_tower", "mm_projector"):
        a = load_file(os.path.join(w, "hf", part, "model.safetensors"))
        b = load_file(os.path.join(w, "hf2", part, "model.safetensors"))
        assert sorted(a) == sorted(b), part
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{part}: {k}"
        n_tensors += len(a)

    # logits: the converted Megatron model (bf16, GPU) vs transformers (bf16 and fp32, GPU)
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    T, nf = cfg.tokens_per_frame, 2
    text = torch.randint(0, 1000, (40,), generator=g)
    tokens = torch.cat([text[:10], torch.full((nf * T,), IMAGE_TOKEN_INDEX), text[10:]]).to(dev)
    frames = (torch.rand(nf, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
              * 2 - 1).to(dev)
    ref32 = _hf_logits(lm.float().to(dev), vt.float().to(dev), proj.float().to(dev), cfg,
                       tokens, frames)
    ref16 = _hf_logits(lm.to(torch.bfloat16), vt.to(torch.bfloat16), proj.to(torch.bfloat16),
                       cfg, tokens, frames.to(torch.bfloat16))
    del lm, vt, proj
    ours = _megatron_logits(cfg, os.path.join(w, "meg"), tokens, frames)
    def rel(x):
        return float((x - ref32).norm() / ref32.norm())
    e_ours, e_hf = rel(ours), rel(ref16)
    # tolerance: the converted model in bf16 is no further from transformers' fp32 logits than
    # 2x transformers' own bf16 run (+1e-3), and its argmax agrees with fp32 on as many
    # positions as transformers' bf16 argmax does, less 3 points (random weights give flat
    # logits, whose argmax any bf16 rounding can flip)
    agree = float((ours.argmax(-1) == ref32.argmax(-1)).float().mean())
    agree_hf = float((ref16.argmax(-1) == ref32.argmax(-1)).float().mean())
    size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in
               os.walk(os.path.join(w, "hf")) for n in ns)
    for d in ("hf", "meg", "hf2"):
        remove(os.path.join(w, d))
    record("HF -> Megatron -> HF (qwen2-1.5b + so400m widths), bf16 logits on GPU",
           seconds=round(t1 + t2, 1), tensors_bit_exact=n_tensors,
           hf_checkpoint_gb=round(size / 1e9, 2),
           rel_err_ours_bf16_vs_hf_fp32=round(e_ours, 5),
           rel_err_hf_bf16_vs_hf_fp32=round(e_hf, 5), argmax_agree_ours=round(agree, 4),
           argmax_agree_hf_bf16=round(agree_hf, 4),
           tolerance="rel err <= 2 x HF bf16's + 1e-3; argmax agreement >= HF bf16's - 0.03",
           note=f"{LLM_LAYERS} of 28 LLM layers, {VISION_LAYERS} of 27 SigLIP layers, "
                f"{len(tokens)} tokens with {nf} frames")
    assert e_ours <= 2 * e_hf + 1e-3, (e_ours, e_hf)
    assert agree >= agree_hf - 0.03, (agree, agree_hf)


def _megatron_logits(cfg, load_dir, tokens, frames):
    from megatron.core import parallel_state

    from megatron_longvila import cpu_compat
    from megatron_longvila.models import LongVILAModel
    from modelutil import init_single_process
    init_single_process()
    assert parallel_state.model_parallel_is_initialized()
    try:
        from megatron_longvila.checkpoint import load_model_weights
    except ImportError:
        from megatron_longvila.training.checkpointing import load_model_weights
    cpu_compat.model_parallel_seed(5)
    model = LongVILAModel(cfg, dtype=torch.bfloat16).cuda().eval()
    load_model_weights(model, load_dir)
    n = tokens.numel()
    with torch.no_grad():
        out = model(tokens[None], torch.arange(n, device=tokens.device)[None],
                    frames.to(torch.bfloat16),
                    cu_seqlens=torch.tensor([0, n], dtype=torch.int32, device=tokens.device),
                    parallel_output=False)
    out = getattr(out, "output", out)  # LongVILAOutput (SP=1: rows in input order)
    return out[0].float()


@pytest.mark.timeout(180)
def test_readme_first_command_on_gpu():
    # the README's first command is `python3 -m venv .venv && . .venv/bin/activate && pip install
    # torch==2.13.0 -e ".[test]" && python pretrain_longvila.py`: the install needs a package
    # registry (none reachable from the GPU machine, and the GPU keeps its CUDA torch), so this
    # row runs its training command, `python pretrain_longvila.py`, as written
    w = work_dir("readme")
    _, out, dt = run([sys.executable, "pretrain_longvila.py"], 170,
                     os.path.join(w, "readme.log"))
    assert "done:" in out and "backend nccl" in out, out[-3000:]
    # Megatron-LM's log line: " [date] iteration      N/     M | consumed samples: ... |"
    last = [l for l in out.splitlines() if re.search(r" iteration +\d+/ *\d+ \|", l)][-1]
    record("README's first command (`python pretrain_longvila.py`)", seconds=round(dt, 1),
           last_iteration=" | ".join(p.strip() for p in last.split("|")[:3]))
