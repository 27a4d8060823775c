"""Issue 15 items 3-4 through the CLI: a SIGTERM (Slurm's time limit) with
--exit-signal-handler finishes the step, saves, exits 0, and the resumed run equals the
uninterrupted one; --exit-interval does the same at an iteration; the TensorBoard event file and
the W&B offline run carry Megatron-LM's tag names with the values of our metrics file;
--profile writes a torch-profiler trace of the asked iterations."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from trainutil import ROOT, SCRIPT, read_metrics, run_cli, train_records

ITERS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_longvila.data import make_synthetic_dataset
    root = tmp_path_factory.mktemp("habits")
    data = make_synthetic_dataset(str(root / "data"), num_videos=40, num_frames=4, image_size=32,
                                  seed=5, shard_max_samples=8)
    common = ["--data-path", data, "--seq-length", 128, "--micro-batch-size", 1,
              "--global-batch-size", 2, "--train-iters", ITERS, "--lr", 2e-3,
              "--lr-warmup-iters", 2, "--min-lr", 1e-4, "--seed", 21, "--num-workers", 2,
              "--log-interval", 1]
    ref = root / "ref.jsonl"
    run_cli(common + ["--metrics-file", ref])
    return root, common, train_records(ref)


def _same_as_reference(recs, ref):
    want = {r["iteration"]: r for r in ref}
    for r in recs:
        q = want[r["iteration"]]
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-6, abs=1e-7), (r, q)
        assert r["lr"] == pytest.approx(q["lr"], rel=1e-9), (r, q)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-5), (r, q)
        assert r["consumed_samples"] == q["consumed_samples"]


def _tracker(save):
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        return int(f.read().strip())


def test_sigterm_with_exit_signal_handler_saves_exits_0_and_resumes_exactly(setup):
    root, common, ref = setup
    save, metrics = root / "sigterm", root / "sigterm.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    args = common + ["--save", save, "--save-interval", 100, "--metrics-file", metrics,
                     "--exit-signal-handler"]
    log = open(root / "sigterm.log", "w+")
    proc = subprocess.Popen([sys.executable, SCRIPT] + [str(a) for a in args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and len(read_metrics(metrics)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the signal"
        # as Slurm does at the time limit: SIGTERM to every process of the job (loader workers too)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        log.seek(0)
        out = log.read()
    assert proc.returncode == 0, out[-4000:]
    first = train_records(metrics)
    reached = first[-1]["iteration"]
    assert 2 <= reached < ITERS, out[-3000:]
    assert [r["iteration"] for r in first] == list(range(1, reached + 1))
    assert f"exiting after iteration {reached}: SIGTERM" in out
    assert _tracker(save) == reached  # a checkpoint at the step reached
    resumed_metrics = root / "sigterm_resumed.jsonl"
    run_cli(common + ["--save", save, "--load", save, "--metrics-file", resumed_metrics])
    resumed = train_records(resumed_metrics)
    assert [r["iteration"] for r in resumed] == list(range(reached + 1, ITERS + 1))
    _same_as_reference(first + resumed, ref)


def test_exit_interval_saves_and_exits_0(setup):
    root, common, ref = setup
    save, metrics = root / "interval", root / "interval.jsonl"
    p = run_cli(common + ["--save", save, "--metrics-file", metrics, "--exit-interval", 3])
    assert "exiting after iteration 3: --exit-interval" in p.stdout
    assert _tracker(save) == 3
    recs = train_records(metrics)
    assert [r["iteration"] for r in recs] == [1, 2, 3]
    _same_as_reference(recs, ref)
    # Megatron-LM's stdout line, every --log-interval
    lines = [ln for ln in p.stdout.splitlines() if "| consumed samples:" in ln]
    assert len(lines) == 3
    for key in ("iteration        3/      12 |", "lm loss: ", "learning rate: ",
                "global batch size:     2 |", "grad norm: ", "loss scale: 1.0 |",
                "elapsed time per iteration (ms): ", "number of skipped iterations:   0 |"):
        assert key in lines[-1], lines[-1]
    assert f"lm loss: {recs[-1]['loss']:.6E} |" in lines[-1]


def _wandb_records(path):
    """The protobuf records of a W&B run file (.wandb): a 7-byte header (":W&B", magic,
    version), then LevelDB log blocks of 32 KiB whose chunks (crc32 4, length 2, type 1:
    full 1, first 2, middle 3, last 4) carry the serialized records."""
    import struct
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        buf += chunk
        if kind in (1, 4):
            yield buf
            buf = b""


def _wandb_history(run_dir):
    """The ``history`` rows of a W&B offline run file, as {step: {key: value}}."""
    from wandb.proto import wandb_internal_pb2
    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    rows = {}
    for data in _wandb_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            row = {it.key or "/".join(it.nested_key): json.loads(it.value_json)
                   for it in rec.history.item}
            if "_step" not in row and rec.history.HasField("step"):
                row["_step"] = rec.history.step.num
            rows[row["_step"]] = row
    return rows


def test_tensorboard_and_wandb_carry_megatron_tags_with_our_values(setup, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    root, common, ref = setup
    tb, wb, metrics = tmp_path / "tb", tmp_path / "wb", tmp_path / "m.jsonl"
    run_cli(common + ["--train-iters", 4, "--lr-decay-iters", ITERS, "--metrics-file", metrics,
                      "--tensorboard-dir", tb, "--wandb-project", "longvila-test",
                      "--wandb-exp-name", "tags", "--wandb-save-dir", wb, "--log-throughput",
                      "--log-params-norm", "--profile", "--profile-step-start", 2,
                      "--profile-step-end", 3],
            env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    recs = train_records(metrics)
    _same_as_reference(recs, ref)  # logging changes nothing of the training
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    pairs = {"lm loss": "loss", "grad-norm": "grad_norm", "learning-rate": "lr",
             "batch-size": "global_batch_size", "loss-scale": "loss_scale",
             "throughput": "throughput", "iteration-time": "iteration_time_s",
             "params-norm": "params_norm", "world-size": "world_size"}
    assert set(pairs) <= tags, tags
    assert "lm loss vs samples" in tags and "loss" not in tags
    for tag, key in pairs.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert sorted(got) == [1, 2, 3, 4], (tag, got)
        for r in recs:
            assert got[r["iteration"]] == pytest.approx(r[key], rel=1e-6), (tag, r)
    vs = {e.step: e.value for e in acc.Scalars("lm loss vs samples")}
    assert vs == {r["consumed_samples"]: pytest.approx(r["loss"], rel=1e-6) for r in recs}
    assert recs[0]["params_norm"] > 0 and recs[0]["throughput"] > 0

    (run_dir,) = glob.glob(str(wb / "wandb" / "offline-run-*"))
    hist = _wandb_history(run_dir)
    assert sorted(hist) == [1, 2, 3, 4]
    for r in recs:
        row = hist[r["iteration"]]
        for tag, key in pairs.items():
            assert row[tag] == pytest.approx(r[key], rel=1e-9), (tag, row)

    traces = glob.glob(str(tb / "trace_rank0_iters2-2.json"))
    assert traces, os.listdir(tb)
    with open(traces[0]) as f:
        assert json.load(f)["traceEvents"]


def test_tensorboard_missing_fails_at_start_up(monkeypatch):
    import importlib.util

    from megatron_longvila.arguments import run_config_from_argv
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tensorboard", "wandb") else real(name, *a))
    with pytest.raises(ValueError, match=r"--tensorboard-dir needs the 'tensorboard' package.*"
                                         r"\.\[logging\]"):
        run_config_from_argv(["--tensorboard-dir", "/tmp/x"], 1)
    with pytest.raises(ValueError, match="--wandb-project needs the 'wandb' package"):
        run_config_from_argv(["--wandb-project", "p"], 1)


def test_help_has_text_for_every_flag_and_says_each_default_once():
    import argparse
    import re

    from megatron_longvila.arguments import build_parser
    p = build_parser()
    shown = [a for a in p._actions if a.option_strings and a.help is not argparse.SUPPRESS]
    assert [a.option_strings[0] for a in shown if not a.help] == []
    text = p.format_help()
    blocks = re.split(r"\n  (?=-)", text)
    for b in blocks:
        assert b.count("(default:") <= 1, b
    assert "--seq-length SEQ_LENGTH\n" in text or "--seq-length SEQ_LENGTH " in text
    assert "(default: 256)" in " ".join(text.split())
