"""Issue 14, checkpoint cases: a damaged or unusable checkpoint / save directory stops the trainer
with one line naming the file or tensor (at start-up where it can be known), and nothing is
overwritten or resumed silently. Cases 2, 4 and 13."""

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from trainutil import ROOT, SCRIPT, run_cli

ITERS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_longvila.data import make_synthetic_dataset
    root = tmp_path_factory.mktemp("faults")
    data = make_synthetic_dataset(str(root / "data"), num_videos=16, num_frames=4, image_size=32,
                                  seed=3, shard_max_samples=8)
    common = ["--data-path", data, "--seq-length", 128, "--micro-batch-size", 1,
              "--global-batch-size", 2, "--lr", 1e-3, "--seed", 7, "--num-workers", 0,
              "--save-interval", 2]
    run_cli(common + ["--save", root / "good", "--train-iters", ITERS])
    return root, common


def _copy(root, name):
    dst = root / name
    shutil.copytree(root / "good", dst)
    return dst


def _snapshot(d):
    return sorted((os.path.relpath(os.path.join(r, f), d), os.path.getsize(os.path.join(r, f)),
                   os.path.getmtime(os.path.join(r, f)))
                  for r, _ds, fs in os.walk(d) for f in fs)


def _one_line_error(p, rc=2):
    assert p.returncode == rc, p.stdout[-4000:]
    assert "Traceback" not in p.stdout, p.stdout[-4000:]
    lines = [ln for ln in p.stdout.splitlines()
             if ln.startswith(("pretrain_longvila.py: error:", "[rank 0] error:"))]
    assert len(lines) == 1, p.stdout[-4000:]
    return lines[0]


def test_orphaned_checkpoints_are_not_overwritten(setup):
    """Case 2: --save == --load, tracker gone, iter_* present: the trainer used to say
    "starting from scratch" and overwrite them; examples/common.sh fell back to LOAD
    --finetune in the same case."""
    root, common = setup
    d = _copy(root, "orphans")
    os.remove(d / "latest_checkpointed_iteration.txt")
    before = _snapshot(d)
    for extra in (["--load", d], []):
        p = run_cli(common + ["--save", d, "--train-iters", ITERS] + extra, check=False)
        line = _one_line_error(p)
        assert ("holds iter_0000002, iter_0000004 but no latest_checkpointed_iteration.txt"
                in line), line
    assert _snapshot(d) == before
    # the stage scripts pass --load SAVE (the trainer refuses), not LOAD --finetune
    out = subprocess.run(["bash", "-c", "source examples/common.sh; longvila_run align x"],
                         cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, SAVE=str(d), LOAD=str(root / "good"),
                                  LAUNCHER="echo")).stdout
    assert f"--load {d}" in out and "--finetune" not in out, out


def test_missing_rank_state_does_not_resume_silently(setup):
    """Case 4: without longvila_rank_state/ the resume used to drop RNG and loader state and
    replay the first samples; now it stops before building the model."""
    root, common = setup
    d = _copy(root, "no_rank_state")
    shutil.rmtree(d / "iter_0000004" / "longvila_rank_state")
    p = run_cli(common + ["--save", d, "--load", d, "--train-iters", 6], check=False)
    line = _one_line_error(p)
    assert "iter_0000004: no per-rank state files in longvila_rank_state/" in line, line
    assert "--finetune" in line
    with open(d / "latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == "4"


@pytest.mark.parametrize("damage,msg", [
    ("truncate", r"__0_0\.distcp: truncated at \d+ bytes; tensor \S+"),
    ("delete", r"__0_0\.distcp: missing \(it holds tensor \S+"),
    ("common", r"common\.pt: unreadable, the checkpoint is corrupt"),
])
def test_damaged_checkpoint_is_one_line_at_startup(setup, damage, msg):
    """Case 13: truncated or deleted .distcp, corrupt common.pt: raw library tracebacks before."""
    import re
    root, common = setup
    d = _copy(root, f"damaged_{damage}")
    ck = d / "iter_0000004"
    if damage == "truncate":
        with open(ck / "__0_0.distcp", "r+b") as f:
            f.truncate(os.path.getsize(ck / "__0_0.distcp") // 3)
    elif damage == "delete":
        os.remove(ck / "__0_0.distcp")
    else:
        (ck / "common.pt").write_bytes(b"not a torch file")
    p = run_cli(common + ["--save", d, "--load", d, "--train-iters", 6], check=False)
    line = _one_line_error(p)
    assert re.search(msg, line), line


def test_architecture_mismatch_names_the_tensor(setup):
    """Case 13: --load of another architecture (here a wider FFN forced with
    --override-checkpoint-config): one line naming the tensor and both shapes."""
    root, common = setup
    p = run_cli(common + ["--load", root / "good", "--finetune", "--train-iters", 1,
                          "--override-checkpoint-config", "--ffn-hidden-size", 48,
                          "--tokenizer-model", "tiny"], check=False)
    line = _one_line_error(p, rc=1)
    assert "has shape" in line and "the model expects" in line and "mlp.linear_fc" in line, line


def test_unwritable_save_dir_is_found_at_startup(setup, tmp_path):
    """Case 13: a save directory that cannot be written was found only at the first save,
    after the training. Now at start-up, before the model is built."""
    root, common = setup
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    p = run_cli(common + ["--save", blocker / "ckpt", "--train-iters", 2], check=False)
    line = _one_line_error(p)
    assert f"--save {blocker / 'ckpt'}: not writable (Not a directory" in line, line
    assert "iteration" not in p.stdout  # nothing trained
    if os.geteuid() != 0:  # root writes into read-only directories anyway
        ro = tmp_path / "ro"
        os.makedirs(ro)
        os.chmod(ro, 0o555)
        p = run_cli(common + ["--save", ro, "--train-iters", 2], check=False)
        assert "not writable (Permission denied" in _one_line_error(p)


def _limited_file_size(limit):
    def pre():
        os.setsid()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


def test_disk_full_during_save_keeps_previous_checkpoint(setup):
    """Case 13: no room for the checkpoint (files limited to 256 KiB, as a full disk fails the
    write): one line, the previous checkpoint still the latest, no partial one left."""
    root, common = setup
    d = _copy(root, "full")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, SCRIPT] + [str(a) for a in common + [
        "--save", d, "--load", d, "--train-iters", 6]]
    # As trainutil.run_cli: output to a file and the process group killed once the trainer
    # exits (what Megatron's checkpoint writer leaves behind would hold a pipe open).
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=log,
                                stderr=subprocess.STDOUT,
                                preexec_fn=_limited_file_size(256 * 1024))
        try:
            proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        log.seek(0)
        p = subprocess.CompletedProcess(cmd, proc.returncode, log.read())
    line = _one_line_error(p, rc=1)
    assert f"saving checkpoint {d}/iter_0000006 failed: File too large" in line, line
    assert "the last complete checkpoint is still iter_0000004" in line, line
    with open(d / "latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == "4"
    assert sorted(os.listdir(d)) == ["iter_0000002", "iter_0000004",
                                     "latest_checkpointed_iteration.txt", "longvila_config.json"]
