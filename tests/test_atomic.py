"""utils/atomic.py: outputs committed whole or not at all (checkpoints, conversions, shards)."""

import os
import subprocess

import pytest

from megatron_longvila.utils.atomic import (OutputError, atomic_output_dir, atomic_write_text,
                                            check_output_vs_inputs, remove_stale_staging,
                                            staging_path)


def test_commit_whole_or_nothing(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(str(out)) as tmp:
        assert tmp == staging_path(str(out)) and os.path.basename(tmp).startswith(".out.tmp-")
        (open(os.path.join(tmp, "a"), "w")).write("1")
        assert not out.exists()  # nothing visible before the commit
    assert (out / "a").read_text() == "1"
    # an error inside: the previous output untouched, no staging left
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "b"), "w").write("2")
            raise RuntimeError("boom")
    assert sorted(os.listdir(out)) == ["a"]
    assert [n for n in os.listdir(tmp_path) if n != "out"] == []
    # an existing output: refused without overwrite, replaced whole with it
    with pytest.raises(OutputError, match="is not empty"):
        with atomic_output_dir(str(out)):
            pass
    with atomic_output_dir(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "c"), "w").write("3")
    assert sorted(os.listdir(out)) == ["c"]
    assert [n for n in os.listdir(tmp_path) if n != "out"] == []


def test_overlapping_input_refused(tmp_path):
    src = tmp_path / "src"
    os.makedirs(src / "sub")
    for out, what in ((src, "is"), (src / "sub" / "x", "is inside"), (tmp_path, "contains")):
        with pytest.raises(OutputError, match=f"{what} the input"):
            check_output_vs_inputs(str(out), [str(src)])
    link = tmp_path / "link"
    os.symlink(src, link)
    with pytest.raises(OutputError, match="is the input"):  # through a symlink too
        check_output_vs_inputs(str(link), [str(src)])
    check_output_vs_inputs(str(tmp_path / "other"), [str(src), None])


def test_stale_staging_removed_only_for_dead_pids(tmp_path):
    p = subprocess.Popen(["true"])
    p.wait()
    out = str(tmp_path / "out")
    dead, dead_old = staging_path(out, pid=p.pid), staging_path(out, "old", pid=p.pid)
    live = staging_path(out, pid=os.getppid())
    other = staging_path(str(tmp_path / "another"), pid=p.pid)
    for d in (dead, dead_old, live, other):
        os.makedirs(d)
    assert sorted(remove_stale_staging(out)) == sorted([dead, dead_old])
    assert os.path.isdir(live) and os.path.isdir(other)


def test_atomic_write_text(tmp_path):
    f = tmp_path / "tracker"
    atomic_write_text(str(f), "5\n")
    atomic_write_text(str(f), "10\n")
    assert f.read_text() == "10\n" and os.listdir(tmp_path) == ["tracker"]
