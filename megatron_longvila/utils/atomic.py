"""Outputs committed whole or not at all: the one mechanism for checkpoints, conversions, shards.

A directory output ``OUT`` is written into a hidden sibling ``.OUT.tmp-<pid>`` (the staging
directory), its files are fsynced, and it is renamed to ``OUT`` in one ``rename(2)``; the
parent directory is fsynced after. A crash before the rename leaves ``OUT`` as it was (absent,
or the previous version); a crash after it leaves the new ``OUT``. An existing ``OUT`` is
replaced only when the caller says so (``replace=True``, e.g. ``--overwrite``): it is first
renamed aside to ``.OUT.old-<pid>``, the new one renamed in, and only then the old one removed.

Small files (a tracker, a config) go through :func:`atomic_write_text` (temporary file in the
same directory, fsync, ``os.replace``).

Staging leftovers of processes that died (SIGKILL, OOM, power loss) are removed by the next
run writing the same output (:func:`remove_stale_staging`): only those whose pid is no longer
alive on this host, so a concurrent writer's staging directory is never touched.

Use::

    with atomic_output_dir(out, overwrite=args.overwrite, inputs=[args.load]) as tmp:
        ... write everything under tmp ...
    # committed here; on an exception nothing is left behind and ``out`` is untouched
"""

import os
import re
import shutil
from contextlib import contextmanager
from typing import Iterable, Optional

_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


class OutputError(RuntimeError):
    """An output that cannot be written as asked (exists, overlaps an input, ...)."""


# ------------------------------------------------------------------ durability

def fsync_file(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str):
    fsync_file(path)  # a directory's entries are made durable the same way on POSIX


def fsync_tree(path: str):
    """fsync every file and directory below ``path`` (and ``path`` itself)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def atomic_write_text(path: str, text: str):
    """Write ``text`` to ``path`` so that readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# ------------------------------------------------------------------ staging directories

def staging_path(final: str, kind: str = "tmp", pid: Optional[int] = None) -> str:
    """``PARENT/.NAME.tmp-<pid>`` (or ``.old-``) for the output ``PARENT/NAME``."""
    final = os.path.abspath(final)
    pid = os.getpid() if pid is None else pid
    return os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.{kind}-{pid}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_staging(final: str, any_pid: bool = False) -> list:
    """Remove ``.NAME.tmp-<pid>`` / ``.NAME.old-<pid>`` next to ``final`` left by dead processes
    (all of them, whatever the pid, with ``any_pid``). Returns the paths removed."""
    final = os.path.abspath(final)
    parent, name = os.path.dirname(final), os.path.basename(final)
    removed = []
    if not os.path.isdir(parent):
        return removed
    for entry in os.listdir(parent):
        m = _STAGING.match(entry)
        if not m or m.group("name") != name:
            continue
        pid = int(m.group("pid"))
        if not any_pid and _pid_alive(pid):
            continue
        path = os.path.join(parent, entry)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def remove_all_staging(parent: str) -> list:
    """Remove every staging leftover directly in ``parent`` (for a directory one writer owns,
    such as a checkpoint save directory)."""
    removed = []
    if not os.path.isdir(parent):
        return removed
    for entry in os.listdir(parent):
        if _STAGING.match(entry):
            path = os.path.join(parent, entry)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_output_vs_inputs(final: str, inputs: Iterable[Optional[str]]):
    """Refuse an output equal to, inside, or holding one of the ``inputs``."""
    out = _real(final)
    for src in inputs:
        if not src:
            continue
        s = _real(src)
        if _inside(out, s) or _inside(s, out):
            what = ("is" if out == s else "is inside" if _inside(out, s) else "contains")
            raise OutputError(f"output {final} {what} the input {src}: choose another output "
                              "directory (the input would be overwritten)")


def prepare_output_dir(final: str, overwrite: bool = False,
                       inputs: Iterable[Optional[str]] = ()) -> str:
    """Check ``final`` may be written, remove stale staging dirs, create and return the staging
    directory. Raises :class:`OutputError` for an existing non-empty output without
    ``overwrite``, a non-directory in its place, or an output overlapping an input."""
    final = os.path.abspath(final)
    check_output_vs_inputs(final, inputs)
    if os.path.exists(final):
        if not os.path.isdir(final):
            raise OutputError(f"output {final} exists and is not a directory")
        if os.listdir(final) and not overwrite:
            raise OutputError(f"output directory {final} is not empty (pass --overwrite to "
                              "replace it)")
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(final)
    tmp = staging_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit_dir(tmp: str, final: str, replace: bool = False, fsync: bool = True):
    """Rename the finished staging directory ``tmp`` to ``final`` (fsynced first).

    An existing empty ``final`` is replaced; a non-empty one only with ``replace`` (renamed
    aside, the new one renamed in, then the old one removed)."""
    final = os.path.abspath(final)
    if fsync:
        fsync_tree(tmp)
    if os.path.isdir(final) and os.listdir(final):
        if not replace:
            raise OutputError(f"output directory {final} appeared while writing; kept it "
                              f"(the new output is in {tmp})")
        old = staging_path(final, "old")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if os.path.isdir(final):
            os.rmdir(final)
        os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


@contextmanager
def atomic_output_dir(final: str, overwrite: bool = False,
                      inputs: Iterable[Optional[str]] = ()):
    """Yield a staging directory; commit it to ``final`` on success, remove it on error."""
    tmp = prepare_output_dir(final, overwrite=overwrite, inputs=inputs)
    try:
        yield tmp
        commit_dir(tmp, final, replace=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
