"""CPU smoke of the issue-8 benchmarks: the FLOP counter against a hand count, the packed
video batch, the Hugging Face reference against our model with equal weights, and the driver
(tiny model, tiny shapes, an injected out-of-memory to exercise the fallbacks)."""

import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

import bench_step  # noqa: E402
from megatron_longvila.training import flops  # noqa: E402
import run_all  # noqa: E402
from megatron_longvila.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from megatron_longvila.models.config import (LanguageModelConfig, LongVILAConfig,  # noqa: E402
                                              VisionConfig)

from modelutil import full_mcore_state_from_hf, init_single_process  # noqa: E402


def _cfg():
    llm = LanguageModelConfig(vocab_size=100, hidden_size=16, num_layers=2, num_attention_heads=4,
                              num_query_groups=2, ffn_hidden_size=24, qkv_bias=True,
                              tie_word_embeddings=True, max_position_embeddings=512)
    vis = VisionConfig(image_size=12, patch_size=4, hidden_size=8, num_layers=3,
                       num_attention_heads=2, intermediate_size=20)
    return LongVILAConfig(llm=llm, vision=vis, projector_type="mlp_downsample",
                          vision_select_layer=-2)


def test_flops_hand_count():
    cfg = _cfg()  # d_head 4; grid 3x3 -> 9 patches, padded 4x4 -> 4 tokens per frame
    assert cfg.tokens_per_frame == 4 and cfg.vision_layers_used == 2
    f = flops.step_flops(cfg, [5, 3], n_frames=2)
    # LLM weights per layer: qkv 16*(4+2*2)*4=512, proj 16*16=256, fc1 16*48=768, fc2 24*16=384
    per_layer = 512 + 256 + 768 + 384
    assert f["llm_dense"] == 3 * 2 * (2 * per_layer) * 8
    assert f["lm_head"] == 3 * 2 * 100 * 16 * 8
    # causal pairs: 5*6/2 + 3*4/2 = 21; per layer fwd 2 matmuls * 2 * pairs * d * heads
    assert f["llm_attention"] == 3 * 2 * 2 * 21 * 4 * 4 * 2
    # ViT layer: 4*8*8 + 2*8*20 = 576 weights, 9 patches, 2 layers used, 2 frames
    assert f["vision_dense"] == 3 * 2 * 2 * 2 * 576 * 9
    assert f["vision_attention"] == 3 * 2 * 2 * 2 * 2 * 9 * 9 * 8
    assert f["patch_embed"] == 3 * 2 * 2 * 9 * (3 * 16) * 8
    # projector on 4 tokens: (4*8 -> 16) + (16 -> 16)
    assert f["projector"] == 3 * 2 * 2 * 4 * (32 * 16 + 16 * 16)
    assert f["total"] == sum(v for k, v in f.items() if k != "total")
    labelled = flops.step_flops(cfg, [5, 3], n_frames=2, labelled_tokens=3)
    assert labelled["lm_head"] == 3 * 2 * 100 * 16 * 3
    assert labelled["total"] == f["total"] - f["lm_head"] + labelled["lm_head"]
    # stage 1 (projector only): the frozen LLM still back-propagates activations (2x), the
    # tower below the projector runs forward only (1x)
    align = flops.step_flops(cfg, [5, 3], n_frames=2, trainable=("projector",))
    assert align["llm_dense"] == f["llm_dense"] * 2 / 3
    assert align["projector"] == f["projector"]
    assert align["vision_dense"] == f["vision_dense"] / 3
    frozen = flops.step_flops(cfg, [5, 3], n_frames=2, train_vision=False)
    assert frozen["vision_dense"] == f["vision_dense"] / 3


def test_flops_weights_are_the_models_matmul_weights():
    """The counted weights are exactly those of the built model's Linear layers that run."""
    from megatron_longvila import cpu_compat
    from megatron_longvila.models import LongVILAModel
    init_single_process()
    cfg = _cfg()
    cpu_compat.model_parallel_seed(0)
    model = LongVILAModel(cfg)
    mats = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
    llm = sum(p.numel() for n, p in model.language_model.named_parameters()
              if n.startswith("decoder.") and n.endswith(mats))
    vis = sum(p.numel() for n, p in model.vision_model.layers[0].named_parameters()
              if n.endswith(mats))
    mp = flops.llm_matmul_params(cfg.llm)
    assert mp["layers"] == llm
    assert mp["lm_head"] == model.language_model.embedding.word_embeddings.weight.numel()
    assert flops.vision_matmul_params_per_layer(cfg.vision) == vis
    proj = sum(m.weight.numel() for m in model.projector.modules()
               if isinstance(m, torch.nn.Linear))
    assert flops.projector_matmul_flops_fwd(cfg) == 2 * cfg.tokens_per_frame * proj


def test_video_batch_layout():
    cfg = _cfg()
    b = bench_step.video_batch(cfg, 300, frames_per_sample=5, text_per_sample=24)
    T = cfg.tokens_per_frame
    assert b["tokens"].shape == (1, 300) and sum(b["seg_lens"]) == 300
    assert b["cu_seqlens"].tolist()[-1] == 300 and b["cu_seqlens"].dtype == torch.int32
    assert int((b["tokens"] == IMAGE_TOKEN_INDEX).sum()) == b["n_frames"] * T
    assert b["frames"].shape[0] == b["n_frames"] == int(b["frames_per_sample"].sum())
    assert b["n_valid"] == int((b["labels"] != IGNORE_INDEX).sum()) > 0
    assert not bool((b["labels"][b["tokens"] == IMAGE_TOKEN_INDEX] != IGNORE_INDEX).any())
    # positions restart at every sub-sequence
    starts = b["cu_seqlens"][:-1].tolist()
    assert all(int(b["position_ids"][0, s]) == 0 for s in starts)


@pytest.mark.parametrize("attn", ["docs", "sdpa"])
def test_hf_reference_equals_ours_with_equal_weights(attn):
    """The reference computes the same loss (and gradient) as our model with the same weights."""
    from megatron_longvila import cpu_compat
    from megatron_longvila.conversion.tp import load_full_state_dict
    from megatron_longvila.models import LongVILAModel
    init_single_process()
    cfg = _cfg()
    lm, vt, proj = bench_step.hf_modules(cfg, attn)
    state = full_mcore_state_from_hf(cfg, lm, vt, proj)  # before the tower is truncated
    ref = bench_step.HFReference(cfg, lm, vt, proj, attn)
    cpu_compat.model_parallel_seed(0)
    ours = LongVILAModel(cfg)
    load_full_state_dict(ours, state)
    b = bench_step.video_batch(cfg, 120, frames_per_sample=3, text_per_sample=20, seed=3)
    assert len(b["seg_lens"]) >= 3
    want = ref(b["tokens"], b["position_ids"], b["frames"], b["labels"], b["seg_lens"])
    got = ours(b["tokens"], b["position_ids"], b["frames"], b["labels"], b["cu_seqlens"],
               b["frames_per_sample"]).output.sum() / b["n_valid"]
    assert abs(float(got) - float(want)) < 1e-4, (float(got), float(want))
    want.backward()
    got.backward()
    torch.testing.assert_close(ours.projector.layers[2].weight.grad,
                               ref.proj.layers[2].weight.grad, rtol=1e-3, atol=1e-5)


def test_attention_table_from_csv(tmp_path):
    p = tmp_path / "attention.csv"
    p.write_text("tokens,docs,method,fwd_ms,fwd_tflops,fwdbwd_ms,fwdbwd_tflops\n"
                 "8192,1doc,ours (SP=1 path),1,400.0,2,380.0\n"
                 "8192,1doc,\"ours, flash varlen only\",1,450.0,2,300.0\n"
                 "8192,1doc,sdpa cudnn,1,500.0,2,400.0\n"
                 "8192,1doc,sdpa flash,1,300.0,2,n/a: OutOfMemoryError\n")
    text = "\n".join(run_all.Driver.attention_table(str(p)))
    assert "| 0.95 (cudnn) |" in text and "| 0.80 (cudnn) |" in text
    assert "ours, flash varlen only fwd+bwd" in text and "| 300.0 |" in text


def test_attention_progress_lines_parse():
    lines = ["tokens   docs  method  fwd_ms  fwd_tflops  fwdbwd_ms  fwdbwd_tflops",
             "  8192   1doc  ours (SP=1 path)    1.25      440.1       4.50      427.9",
             "131072  6docs  sdpa flash    n/a      n/a        n/a  n/a: OutOfMemoryError",
             "some other line"]
    rows = run_all.parse_attention_lines(lines)
    assert rows == [
        dict(tokens="8192", docs="1doc", method="ours (SP=1 path)", fwd_ms="1.25",
             fwd_tflops="440.1", fwdbwd_ms="4.50", fwdbwd_tflops="427.9"),
        dict(tokens="131072", docs="6docs", method="sdpa flash", fwd_ms="n/a",
             fwd_tflops="n/a", fwdbwd_ms="n/a", fwdbwd_tflops="n/a: OutOfMemoryError")]


def test_driver_smoke(tmp_path, monkeypatch):
    """The whole driver on the CPU with an injected OOM: lengths above 128 tokens 'OOM'
    unless fully recomputed, above 256 always. Expect the cascade none -> vision -> full at
    256, and a ladder that stops at 384."""
    monkeypatch.setenv("BENCH_FAKE_OOM_ABOVE", "128")
    out = tmp_path / "out"
    res = run_all.main(["--out", str(out), "--smoke", "--phases", "ours,hf",
                        "--budget-s", "600"])
    rows = res["rows"]
    kinds = {r["kind"] for r in rows}
    assert {"env", "sanity", "peak", "model", "step"} <= kinds
    assert next(r for r in rows if r["kind"] == "sanity")["status"] == "ok"
    for impl in ("ours", "hf (sdpa per document)"):
        steps = [(r["tokens"], r["recompute"], r["status"]) for r in rows
                 if r["kind"] == "step" and r["impl"] == impl and not r["ladder"]]
        assert steps == [(128, "none", "ok"), (256, "none", "OOM"), (256, "vision", "OOM"),
                         (256, "full", "ok")], (impl, steps)
        ladder = [(r["tokens"], r["status"]) for r in rows
                  if r["kind"] == "step" and r["impl"] == impl and r["ladder"]]
        assert ladder == [(256, "ok"), (384, "OOM")], (impl, ladder)
        assert f"- {impl}: longest that trains: **256** tokens" in res["text"]
    ok = [r for r in rows if r["kind"] == "step" and r["status"] == "ok"]
    assert all(r["tokens_per_s"] > 0 and r["model_tflop_per_step"] > 0 and "mfu" in r
               for r in ok)
    assert not res["skipped"], res["skipped"]
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert (out / "tables.md").read_text().startswith("# LongVILA benchmarks")
    assert not (out / "rows.jsonl").exists()


@pytest.mark.parametrize("impl", ["ours", "hf"])
def test_step_trains(impl):
    """A few optimizer steps on one batch lower the loss: gradients reach the optimizer."""
    init_single_process()
    cfg = _cfg()
    dev = torch.device("cpu")
    if impl == "ours":
        runner = bench_step.Ours(cfg, dev, torch.float32, lr=3e-3, model_name="tiny")
        assert runner.optimizer == "megatron-core", runner.optimizer
        # the trainer's builders are used when they are there
        assert runner.setup.startswith("trainer"), runner.setup
        # the fused-AdamW switch finds the inner torch optimizers (used on CUDA only)
        assert bench_step.use_fused_adam(runner.opt)
        for o in getattr(runner.opt, "chained_optimizers", [runner.opt]):
            assert all(g["fused"] for g in o.optimizer.param_groups)
            for g in o.optimizer.param_groups:
                g["fused"], g["foreach"] = None, None  # back to the CPU implementation
    else:
        runner = bench_step.HF(cfg, dev, torch.float32, attn="docs", lr=3e-3)
    b = bench_step.video_batch(cfg, 120, frames_per_sample=3, text_per_sample=20, seed=3)
    losses = [float(runner.step(b)) for _ in range(4)]
    assert losses[-1] < losses[0] - 0.05, losses


def test_recompute_modes_switch(monkeypatch):
    """The runtime switch of recompute modes reaches the blocks that run (ours: Megatron's
    checkpoint per ViT / LLM layer; HF: gradient checkpointing flags of the layers)."""
    from megatron.core import tensor_parallel
    init_single_process()
    cfg = _cfg()
    dev = torch.device("cpu")
    runner = bench_step.Ours(cfg, dev, torch.float32, model_name="tiny")
    b = bench_step.video_batch(cfg, 60, frames_per_sample=3, text_per_sample=20)
    calls = []
    real = tensor_parallel.checkpoint
    monkeypatch.setattr(tensor_parallel, "checkpoint",
                        lambda fn, *a, **k: calls.append(1) or real(fn, *a, **k))
    want = {"none": 0, "vision": cfg.vision_layers_used,
            "full": cfg.vision_layers_used + cfg.llm.num_layers}
    for mode, n in want.items():
        calls.clear()
        runner.set_recompute(mode)
        runner.step(b)
        assert len(calls) == n, (mode, len(calls))
    hf = bench_step.HF(cfg, dev, torch.float32)
    for mode in ("none", "vision", "full"):
        hf.set_recompute(mode)
        vis = [m.gradient_checkpointing for m in hf.ref.vt.modules()
               if hasattr(m, "gradient_checkpointing") and isinstance(m, torch.nn.Module)
               and type(m).__name__.endswith("EncoderLayer")]
        llm = [m.gradient_checkpointing for m in hf.ref.lm.modules()
               if type(m).__name__.endswith("DecoderLayer")]
        assert vis and llm
        assert all(vis) == (mode != "none") and not any(vis) == (mode == "none")
        assert all(llm) == (mode == "full") and not any(llm) == (mode != "full")


def test_trainer_flops_are_the_benchmark_flops():
    from megatron_longvila.training.metrics import micro_batch_flops
    cfg = _cfg()
    T = cfg.tokens_per_frame
    tokens = torch.cat([torch.arange(2), torch.full((2 * T,), IMAGE_TOKEN_INDEX), torch.arange(3),
                        torch.arange(4)])[None]
    labels = torch.full_like(tokens, IGNORE_INDEX)
    labels[0, -5:-2] = 1
    n = tokens.shape[1]
    batch = {"tokens": tokens, "labels": labels, "cu_seqlens": torch.tensor([0, n - 4, n]),
             "frames": torch.zeros(2, 3, cfg.vision.image_size, cfg.vision.image_size)}
    got = micro_batch_flops(cfg, batch, ("vision", "projector", "llm"))
    want = flops.step_flops(cfg, [n - 4, 4], n_frames=2, labelled_tokens=3)["total"]
    assert got == want
