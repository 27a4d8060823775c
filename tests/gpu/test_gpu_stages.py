"""GPU check, rows 1-7: LongVILA's five stages chained through the stage scripts as written
(examples/stage*.sh, their defaults: bf16, --use-distributed-optimizer, SEQ, FRAMES, the
embedded synthetic data) on the qwen2-1.5b preset (real widths and vocabulary, SigLIP so400m,
LLM_LAYERS of 28 LLM layers), a few iterations each, every stage saving and the next loading
it; then tools/generate.py and tools/eval_needle.py on stage 5's GPU checkpoint."""

import json
import math
import os
import sys

import pytest

from gpucheck import LLM_LAYERS, PRESET, ROOT, record, records, remove, run, \
    synthetic_seconds, work_dir

pytestmark = pytest.mark.gpu

STAGES = [("stage1_align", "align"), ("stage2_pretrain", "pretrain"),
          ("stage3_short_sft", "sft"), ("stage4_context_extension", "context-extension"),
          ("stage5_long_sft", "long-sft")]
ITERS = 2
DONE = {}


@pytest.mark.timeout(200)
@pytest.mark.parametrize("k", range(1, 6))
def test_stage(k):
    script, stage = STAGES[k - 1]
    w = work_dir("stages")
    save, metrics, log = (os.path.join(w, f"stage{k}"), os.path.join(w, f"stage{k}.jsonl"),
                          os.path.join(w, f"stage{k}.log"))
    remove(save)
    if k > 1 and (k - 1) not in DONE:
        pytest.fail(f"stage {k - 1} did not complete: nothing to load")
    prev = DONE.get(k - 1, "none")
    rc, out, dt = run(["bash", os.path.join(ROOT, "examples", f"{script}.sh"),
                       "--num-layers", LLM_LAYERS, "--metrics-file", metrics, "--log-interval", 1,
                       "--num-workers", 2],
                      timeout=190, log=log,
                      env_extra=dict(MODEL=PRESET, NPROC=1, PYTHON=sys.executable, SAVE=save,
                                     LOAD=prev, TRAIN_ITERS=ITERS, GBS=1))
    recs = records(metrics)
    assert [r["iteration"] for r in recs] == list(range(1, ITERS + 1)), out[-3000:]
    assert all(math.isfinite(r["loss"]) for r in recs), recs
    assert "--bf16" in out and "--use-distributed-optimizer" in out
    if k > 1:
        assert "weights only" in out, out[-3000:]
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == str(ITERS)
    size = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in
               os.walk(os.path.join(save, f"iter_{ITERS:07d}")) for n in ns)
    cmd = next((l for l in out.splitlines() if l.startswith("+ ")), "")
    seq = cmd.split("--seq-length ")[1].split()[0] if "--seq-length " in cmd else "?"
    DONE[k] = save
    if k > 2:  # keep the disk small: stage k loaded stage k-1
        remove(DONE.pop(k - 2, ""))
    record(f"stage {k} ({stage})", seconds=round(dt, 1), seq_length=seq,
           losses=[round(r["loss"], 4) for r in recs],
           tokens_per_s=round(recs[-1]["tokens_per_s"]),
           tflops_per_gpu=round(recs[-1]["tflops_per_gpu"], 1),
           synthetic_data_s=synthetic_seconds(out), checkpoint_gb=round(size / 1e9, 2),
           loaded=os.path.basename(prev), note=f"{LLM_LAYERS} of 28 LLM layers")


def _stage5_checkpoint():
    """Stage 5's checkpoint of this run, or GPU_CHECK_CHECKPOINT (rows 6-7 alone, e.g. rerun
    with -k on a checkpoint made otherwise)."""
    ckpt = DONE.get(5) or os.environ.get("GPU_CHECK_CHECKPOINT")
    if not ckpt:
        pytest.fail("stage 5 did not complete: no GPU checkpoint")
    return ckpt


def _needle_inputs():
    from megatron_longvila.data.synthetic import make_synthetic_videos
    w = work_dir("needle_inputs")
    ann = make_synthetic_videos(w, num_videos=1, frames_per_video=16, width=384, height=288,
                                seed=3)
    with open(ann) as f:
        video = os.path.join(w, json.load(f)[0]["video"])
    from PIL import Image
    img = os.path.join(w, "needle.png")
    Image.new("RGB", (384, 384), (220, 30, 30)).save(img)
    needles = os.path.join(w, "needles.json")
    with open(needles, "w") as f:
        json.dump([{"image": "needle.png", "question": "What colour is the square?",
                    "answer": "red"}], f)
    return video, needles


@pytest.mark.timeout(150)
def test_generate_on_gpu_checkpoint():
    ckpt = _stage5_checkpoint()
    video, _ = _needle_inputs()
    log = os.path.join(work_dir("stages"), "generate.log")
    rc, out, dt = run([sys.executable, "tools/generate.py", "--load", ckpt, "--video", video,
                       "--num-frames", 8, "--prompt", "What colour is the square?",
                       "--max-new-tokens", 8, "--json"], timeout=140, log=log)
    lines = [l for l in out.splitlines() if l.startswith("{")]
    assert lines, out[-3000:]
    res = json.loads(lines[-1])
    record("tools/generate.py on the stage-5 checkpoint", seconds=round(dt, 1),
           output={k: (str(v)[:60] if isinstance(v, str) else v) for k, v in
                   list(res.items())[:5] if not isinstance(v, (list, dict))})


@pytest.mark.timeout(200)
def test_eval_needle_on_gpu_checkpoint():
    ckpt = _stage5_checkpoint()
    _, needles = _needle_inputs()
    w = work_dir("stages")
    out_json = os.path.join(w, "niah.json")
    remove(out_json)
    rc, out, dt = run([sys.executable, "tools/eval_needle.py", "--load", ckpt,
                       "--haystack", "synthetic", "--needles", needles, "--frame-counts", "8,32",
                       "--depths", "0,0.5,1", "--max-new-tokens", 4, "--output", out_json,
                       "--overwrite"], timeout=190, log=os.path.join(w, "eval_needle.log"))
    with open(out_json) as f:
        res = json.load(f)
    text = json.dumps(res)
    record("tools/eval_needle.py on the stage-5 checkpoint", seconds=round(dt, 1),
           grid="frames 8,32 x depths 0,0.5,1",
           summary={k: v for k, v in res.items() if not isinstance(v, (list, dict))},
           note="random-init model: accuracy is not the point, the run on a GPU checkpoint is")
    assert "accuracy" in text or "correct" in text, text[:2000]
