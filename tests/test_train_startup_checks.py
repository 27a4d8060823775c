"""Issue 14, the trainer's cases: what the old main accepted silently or answered with a
traceback now stops with one line naming the problem (or, for the leaked processes, leaves
nothing behind).

6: --num-frames 0 / negative; 7: --model PRESET with a --load checkpoint of another shape;
8: batches without a label token; 9: an error after a save leaves no process holding stdout;
14: --global-batch-size 0, --lr nan, a negative blend weight, a tokenizer without a
detectable chat template."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_longvila.arguments import run_config_from_argv
from trainutil import ROOT, SCRIPT, run_cli


def _refused(argv, *needles):
    with pytest.raises(ValueError) as e:
        run_config_from_argv(argv, 1)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize("frames", ["0", "-3"])
def test_case6_num_frames_must_be_positive(frames):
    _refused(["--num-frames", frames], "--num-frames", frames)
    assert run_config_from_argv(["--num-frames", "2"], 1).data.num_frames == 2


from megatron_longvila.models.config import get_preset  # noqa: E402


def _tiny_checkpoint_dir(tmp_path):
    """A directory with what --load reads before the model is built: the tracker and the
    stored architecture (the tiny preset's)."""
    from megatron_longvila.checkpoint import TRACKER_FILE
    from megatron_longvila.checkpoint.files import CONFIG_FILE
    from megatron_longvila.models.config import get_preset
    d = tmp_path / "tiny_ckpt"
    d.mkdir()
    (d / TRACKER_FILE).write_text("5")
    (d / CONFIG_FILE).write_text(json.dumps(get_preset("tiny").to_dict()))
    return str(d)


def test_case7_model_preset_must_match_the_loaded_checkpoint(tmp_path):
    load = _tiny_checkpoint_dir(tmp_path)
    msg = _refused(["--model", "qwen2-1.5b", "--load", load], "--model qwen2-1.5b", load,
                   "hidden_size 64 (preset 1536)")
    assert "num_layers 2 (preset 28)" in msg
    # the matching preset, or no --model at all: the checkpoint's architecture, named so.
    # (Resolved by the model section alone: run_config_from_argv also verifies that the
    # checkpoint is complete, which this directory of config + tracker is not.)
    from megatron_longvila.config import ModelConfig, preset_name_of
    for name in ("tiny", None):
        arch = ModelConfig(name=name).resolve_arch(load)
        assert arch.llm.hidden_size == 64 and preset_name_of(arch) == "tiny"
    # the preset with the shape flags given beside it is what is compared: --model qwen2-1.5b
    # --num-layers 2 --hidden-size 64 ... equals the stored shape and is accepted
    tiny = get_preset("tiny").llm
    arch = ModelConfig(name="qwen2-1.5b", num_layers=tiny.num_layers, hidden_size=tiny.hidden_size,
                       ffn_hidden_size=tiny.ffn_hidden_size,
                       num_attention_heads=tiny.num_attention_heads,
                       num_query_groups=tiny.num_query_groups,
                       vocab_size=tiny.vocab_size).resolve_arch(load)
    assert arch.llm.hidden_size == 64
    # --override-checkpoint-config: the flags win, as documented
    arch = ModelConfig(name="qwen2-1.5b", override_checkpoint_config=True).resolve_arch(load)
    assert arch.llm.hidden_size == 1536


@pytest.mark.parametrize("argv,needles", [
    (["--global-batch-size", "0"], ["--global-batch-size", ">= 1", "0"]),
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--lr", "inf"], ["--lr", "inf"]),
    (["--min-lr", "-1"], ["--min-lr", "-1"]),
])
def test_case14_bad_numbers_refused(argv, needles):
    msg = _refused(argv, *needles)
    assert msg.startswith(needles[0]), msg  # the message leads with the flag it names


def test_case14_negative_blend_weight_refused(tmp_path):
    from megatron_longvila.data import make_synthetic_dataset
    data = make_synthetic_dataset(str(tmp_path / "d"), num_videos=2, num_frames=2, image_size=32)
    _refused(["--data-path", "0.5", data, "-0.5", data], "--data-path", "-0.5")
    _refused(["--data-path", "0", data, "0", data], "not all 0")
    _refused(["--data-path", "nan", data, "1", data], "nan")
    run_config_from_argv(["--data-path", "0.3", data, "0.7", data], 1)


def _single_line_error(p, *needles):
    assert p.returncode not in (0, None), p.stdout[-3000:]
    assert "Traceback" not in p.stdout, p.stdout[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if "error:" in ln]
    assert len(lines) == 1, p.stdout[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_case14_bad_values_give_one_line_at_the_command_line():
    p = run_cli(["--lr", "nan"], check=False, timeout=120)
    assert p.returncode == 2
    _single_line_error(p, "--lr", "nan")


def test_case14_tokenizer_without_chat_template_is_one_line(tmp_path):
    from test_data_vila_format import train_tokenizer
    tok = train_tokenizer(tmp_path / "plain_tok", ["<unk>", "</s>"], eos="</s>")
    p = run_cli(["--tokenizer-model", tok, "--train-iters", 1, "--synthetic-videos", 2,
                 "--num-workers", 0, "--seq-length", 128, "--synthetic-dir", tmp_path / "syn"],
                check=False)
    line = _single_line_error(p, "--tokenizer-model", "cannot tell the chat template")
    assert p.returncode != 0 and "cannot tell the chat template" in line, p.stdout[-2000:]


def test_case8_iterations_without_a_label_token_are_counted_and_stop(capsys):
    """A global batch without a single label token trains nothing (loss 0): each such
    iteration is warned about and counted; past --max-skipped-iters the run stops naming it."""
    from megatron_longvila.training.step import StepResult
    from megatron_longvila.training.train import TrainingError, check_step
    cfg = run_config_from_argv(["--max-skipped-iters", "2"], 1)
    consumed = {"samples": 0, "micro_batches": 0, "skipped_iterations": 0}
    empty = StepResult(loss=0.0, label_tokens=0, grad_norm=0.0, lr=1e-3, samples=2, tokens=256,
                       flops=0.0)
    full = StepResult(loss=5.0, label_tokens=40, grad_norm=1.0, lr=1e-3, samples=2, tokens=256,
                      flops=0.0)
    check_step(cfg, full, 1, consumed)
    check_step(cfg, empty, 2, consumed)
    check_step(cfg, empty, 3, consumed)
    assert consumed["empty_label_iterations"] == 2
    out = capsys.readouterr().out
    assert out.count("the global batch has no label token") == 2
    with pytest.raises(TrainingError) as e:
        check_step(cfg, empty, 4, consumed)
    msg = str(e.value)
    assert "\n" not in msg
    for n in ("iteration 4", "3 iterations had no label token", "--max-skipped-iters 2"):
        assert n in msg, msg


def _own_orphans(marker):
    """Processes still alive whose command line or environment carries ``marker``."""
    alive = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    alive.append(int(pid))
        except OSError:
            continue
    return alive


def test_case9_error_after_a_save_leaves_no_process_holding_stdout(tmp_path):
    """`pretrain_longvila.py ... | cat`: the pipe must close when the trainer stops on an error
    after a checkpoint save (the old main left Megatron's results Manager and a resource
    tracker alive holding it)."""
    marker = f"LONGVILA_CASE9_{os.getpid()}_{time.time_ns()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **{marker: "1"})
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    args = ["--train-iters", 4, "--save", tmp_path / "ckpt", "--save-interval", 1,
            "--debug-nan-at-iteration", 2, "--synthetic-videos", 4, "--num-workers", 0,
            "--seq-length", 128, "--synthetic-dir", tmp_path / "syn"]
    proc = subprocess.Popen([sys.executable, SCRIPT] + [str(a) for a in args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)  # EOF only when no process holds the pipe
    except subprocess.TimeoutExpired:
        out = b""
    finally:
        left = [p for p in _own_orphans(marker)]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    text = out.decode(errors="replace")
    assert "iteration 2: loss nan" in text, text[-3000:]
    assert "saved checkpoint" in text
    assert proc.returncode == 1
    assert left == [], f"processes left behind: {left}"
