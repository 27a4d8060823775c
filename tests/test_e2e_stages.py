"""End to end on the CPU: the five LongVILA stages (examples/stage*.sh) on the tiny preset, each
loading the last, stage 1 a model-only "release" checkpoint (the HF converter's output
format); parts frozen in a stage keep their exact weights, trained parts change; the
loss of the short SFT run falls; stage 5 runs with MM-SP (SP=2)."""

import os
import subprocess
import sys

import pytest
import torch

from dist import run_distributed
from trainutil import ROOT, train_records

STAGES = [  # script, trained parts, extra environment
    ("stage1_align.sh", {"projector"}, {}),
    ("stage2_pretrain.sh", {"projector", "llm"}, {}),
    ("stage3_short_sft.sh", {"vision", "projector", "llm"}, {"TRAIN_ITERS": "8"}),
    ("stage4_context_extension.sh", {"llm"}, {}),
    ("stage5_long_sft.sh", {"vision", "projector", "llm"}, {"NPROC": "2"}),
]


def _part(name):
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("projector."):
        return "projector"
    assert name.startswith("language_model."), name
    return "llm"


def _load_all(rank, world, dirs):
    from megatron.core import parallel_state
    from megatron_longvila import cpu_compat
    from megatron_longvila.conversion.tp import full_state_dict
    from megatron_longvila.models import LongVILAModel
    from megatron_longvila.checkpoint import load_model_weights, read_checkpoint_config
    parallel_state.initialize_model_parallel(1, 1)
    # stage 1 starts from the model-only "release" checkpoint (what the HF converter writes)
    states = []
    for d in dirs:
        cpu_compat.model_parallel_seed(0)
        model = LongVILAModel(read_checkpoint_config(d))
        load_model_weights(model, d)
        states.append({k: v.clone() for k, v in full_state_dict(model).items()})
    # compare here: only small results travel back to the test process
    changed = []
    for before, after in zip(states[:-1], states[1:]):
        assert before.keys() == after.keys()
        changed.append(sorted(k for k in after if not torch.equal(before[k], after[k])))
    return changed, sorted(states[0]), [read_checkpoint_config(d).llm.rope_base for d in dirs]


@pytest.mark.timeout(1200)
def test_five_stages_tiny(tmp_path):
    release = tmp_path / "converted"
    run_distributed(_write_release, 1, str(release))
    assert (release / "release").is_dir()
    dirs, metrics, prev = [str(release)], [], release
    for i, (script, _trained, extra) in enumerate(STAGES, 1):
        save = tmp_path / f"stage{i}"
        m = tmp_path / f"stage{i}.jsonl"
        env = dict(os.environ, MODEL="tiny", NPROC="1", TRAIN_ITERS="3", PYTHON=sys.executable,
                   SAVE=str(save), LOG=str(tmp_path / f"stage{i}.log"), PYTHONWARNINGS="ignore")
        env.pop("LOAD", None)
        env["LOAD"] = str(prev)
        env.update(extra)
        # a fresh synthetic dataset per stage, kept inside tmp_path
        script_args = f"--metrics-file {m} --synthetic-dir {tmp_path / f'data{i}'} --num-workers 1"
        _run_stage_with_args(script, env, script_args.split())
        recs = train_records(m)
        assert len(recs) == int(env["TRAIN_ITERS"]) and all(
            r["loss"] == r["loss"] for r in recs), recs
        with open(env["LOG"]) as f:
            log = f.read()
        assert "weights only" in log, log[-2000:]
        dirs.append(str(save))
        metrics.append(recs)
        prev = save
    assert "SP=2" in open(tmp_path / "stage5.log").read()

    (changed, names, rope_bases), = run_distributed(_load_all, 1, dirs)
    assert len(names) > 30
    for i in range(len(STAGES)):  # changed[i]: stage i+1's output vs its input
        trained = STAGES[i][1]
        frozen_changed = [k for k in changed[i] if _part(k) not in trained]
        assert not frozen_changed, f"stage {i + 1}: frozen parameters changed: {frozen_changed}"
        parts = {_part(k) for k in changed[i]}
        assert parts == trained, f"stage {i + 1}: changed parts {parts}, trained {trained}"
    # stage 4 raised the RoPE base; stage 5 kept it (rope_bases[0]: the release checkpoint)
    assert rope_bases[4] == rope_bases[5] == 100000 != rope_bases[3]
    # the short SFT run's loss falls
    sft = [r["loss"] for r in metrics[2]]
    assert sum(sft[-3:]) / 3 < sum(sft[:3]) / 3, sft


def _write_release(rank, world, out_dir):
    from megatron.core import parallel_state
    from megatron_longvila import cpu_compat
    from megatron_longvila.models import LongVILAModel, get_preset
    from megatron_longvila.checkpoint import save_model_checkpoint
    parallel_state.initialize_model_parallel(1, 1)
    cpu_compat.model_parallel_seed(4242)  # not the trainer's seed: stage 1 must load these
    save_model_checkpoint(LongVILAModel(get_preset("tiny")), out_dir)


def _run_stage_with_args(script, env, args):
    cmd = ["bash", os.path.join(ROOT, "examples", script)] + [str(a) for a in args]
    with open(env["LOG"], "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            p.wait(timeout=300)
        finally:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass
    if p.returncode:
        with open(env["LOG"]) as f:
            raise AssertionError(f"{script} failed (rc {p.returncode}):\n{f.read()[-5000:]}")
