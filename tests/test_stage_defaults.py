"""The stage scripts' defaults pass the trainer's start-up checks on every real preset, as
written (no SEQ/FRAMES/LOAD in the environment): the arguments each script builds are
validated by ``run_config_from_argv`` itself (the script's launcher is replaced by a checker)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("stage1_align", "stage2_pretrain", "stage3_short_sft", "stage4_context_extension",
          "stage5_long_sft")
CHECKER = r'''
import json, os, sys
from megatron_longvila.arguments import run_config_from_argv
a = run_config_from_argv(sys.argv[2:], 1)  # argv[1] is pretrain_longvila.py
c = a.arch.llm
print("CHECKED " + json.dumps({"seq": a.training.seq_length, "pos": c.max_position_embeddings,
                               "rope": c.rope_base, "frames": a.data.num_frames}), flush=True)
os._exit(0)  # the check is done; skip interpreter teardown (slow on a loaded 2-core machine)
'''


@pytest.mark.parametrize("model,train_iters", [("qwen2-1.5b", None), ("llama3-8b", "2")])
def test_stage_scripts_defaults_validate_on_presets(tmp_path, model, train_iters):
    """As written; and as a short test run (TRAIN_ITERS=2: the warmup shrinks with it)."""
    checker = tmp_path / "check.py"
    checker.write_text(CHECKER)
    wrapper = tmp_path / "py"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {checker} \"$@\"\n")
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("SEQ", "FRAMES", "LOAD", "SAVE", "GBS", "TRAIN_ITERS", "SP", "RING")}
    if train_iters:
        env["TRAIN_ITERS"] = train_iters
    env.update(MODEL=model, PYTHON=str(wrapper), PYTHONPATH=ROOT + os.pathsep +
               env.get("PYTHONPATH", ""))
    seen = {}
    for stage in STAGES:
        # from scratch (LOAD=none): no checkpoint of an earlier stage to inherit positions from
        env.update(SAVE=str(tmp_path / stage), LOAD="none")
        p = subprocess.run(["bash", os.path.join(ROOT, "examples", f"{stage}.sh")], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
        out = p.stdout + p.stderr
        assert p.returncode == 0 and "CHECKED" in out, f"{stage} on {model}:\n{out[-3000:]}"
        seen[stage] = json.loads(out.split("CHECKED ", 1)[1].splitlines()[0])
    s4, s5 = seen["stage4_context_extension"], seen["stage5_long_sft"]
    assert s5["seq"] == 65536 and s5["pos"] >= s5["seq"]
    # stage 5 without stage 4's checkpoint raises the positions with stage 4's RoPE base
    assert s5["rope"] == s4["rope"] and s5["pos"] == s4["pos"]
