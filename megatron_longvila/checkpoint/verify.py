"""Checks that turn a bad checkpoint or save directory into one clear line, before any work.

- :func:`check_save_dir`: ``--save`` can be written (found at start-up, not at the first save
  after hours of training);
- :func:`check_no_orphans`: ``iter_*`` folders without a tracker are never silently
  overwritten by a run that believes it starts from scratch;
- :func:`verify_checkpoint`: a checkpoint folder is complete (``metadata.json``, a readable
  ``common.pt``, every ``.distcp`` byte range its metadata names);
- :func:`check_resume`: the checkpoint to resume holds what resuming needs at this layout
  (the per-rank RNG / loader state);
- :func:`check_shapes`: the model asks for tensors of the shapes the checkpoint holds
  (another architecture is named, tensor and both shapes).
"""

import json
import os
from typing import Any, Dict, Optional, Union

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

from .files import RANK_STATE_DIR, TRACKER_FILE, checkpoint_dir, has_checkpoint


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read as asked; the message is one line."""


# What a failed read or write of a checkpoint raises: PyTorch DCP's CheckpointException
# derives from BaseException, not Exception.
FAILURES = (Exception, CheckpointException)


def root_cause(e: BaseException) -> str:
    """The innermost OS error of an exception chain, looking into DCP's per-rank failures
    (else the innermost exception's first line)."""
    seen, stack, last = set(), [e], e
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        last = cur
        if isinstance(cur, OSError) and cur.strerror:
            where = f" ({cur.filename})" if cur.filename else ""
            return f"{cur.strerror}{where}"
        if isinstance(cur, CheckpointException):
            stack += [f[0] if isinstance(f, tuple) else f for f in cur.failures.values()]
        stack += [cur.__context__, cur.__cause__]
    text = str(last).strip().splitlines()
    return f"{type(last).__name__}: {text[0] if text else ''}".rstrip(": ")


def write_probe(directory: str, nbytes: int = 1 << 20) -> Optional[str]:
    """Why ``directory`` cannot take ``nbytes`` more (disk full, read-only, quota), or None.

    Used after a failed save, whose library error often hides the OS error."""
    probe = os.path.join(directory, f".write-test-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            for _ in range(0, nbytes, 1 << 16):
                f.write(b"\0" * (1 << 16))
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as e:
        return root_cause(e)
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass


def check_save_dir(save_dir: str):
    """Create ``save_dir`` if needed and prove a file can be written and removed there."""
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise CheckpointError(f"--save {save_dir}: exists and is not a directory")
    probe = os.path.join(save_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(save_dir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"--save {save_dir}: not writable ({root_cause(e)})") from e


def orphaned_iterations(save_dir: Optional[str]) -> list:
    """``iter_*`` folders of ``save_dir`` when it has no tracker file (else [])."""
    if not save_dir or not os.path.isdir(save_dir) or has_checkpoint(save_dir):
        return []
    return sorted(e for e in os.listdir(save_dir)
                  if e.startswith("iter_") and os.path.isdir(os.path.join(save_dir, e)))


def check_no_orphans(save_dir: Optional[str]):
    """Refuse to start from scratch in a directory whose checkpoints lost their tracker."""
    orphans = orphaned_iterations(save_dir)
    if orphans:
        last = orphans[-1][len("iter_"):].lstrip("0") or "0"
        raise CheckpointError(
            f"{save_dir} holds {', '.join(orphans)} but no {TRACKER_FILE}: a run starting "
            "from scratch would overwrite them; restore the tracker (e.g. echo "
            f"{last} > {os.path.join(save_dir, TRACKER_FILE)}) or choose another directory")


def verify_checkpoint(path: str) -> Dict[str, Any]:
    """Check the dist checkpoint folder ``path`` is complete; returns its common state."""
    meta_json = os.path.join(path, "metadata.json")
    try:
        with open(meta_json) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_json}: unreadable ({root_cause(e)})") from e
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except FAILURES as e:  # any failure to read it is the same finding
        raise CheckpointError(f"{os.path.join(path, 'common.pt')}: unreadable, the checkpoint "
                              f"is corrupt ({root_cause(e)})") from e
    try:
        md = dcp.FileSystemReader(path).read_metadata()
    except FAILURES as e:
        raise CheckpointError(f"{os.path.join(path, '.metadata')}: unreadable, the checkpoint "
                              f"is corrupt ({root_cause(e)})") from e
    by_file: Dict[str, list] = {}
    for index, info in (md.storage_data or {}).items():
        by_file.setdefault(info.relative_path, []).append(
            (info.offset, info.offset + info.length, index))
    for rel, items in sorted(by_file.items()):
        f = os.path.join(path, rel)
        items.sort(key=lambda x: x[0])
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: missing (it holds {_chunk(items[0][2])} and "
                                  f"{len(items) - 1} more chunks); the checkpoint is incomplete")
        size = os.path.getsize(f)
        cut = [it for it in items if it[1] > size]
        if cut:
            start, end, index = cut[0]
            raise CheckpointError(f"{f}: truncated at {size} bytes; {_chunk(index)} (bytes "
                                  f"{start}-{end}) and {len(cut) - 1} more chunks lie past the "
                                  "end: the checkpoint is incomplete")
    return common


def _chunk(index) -> str:
    off = tuple(index.offset) if index.offset is not None else ()
    return f"tensor {index.fqn}" + (f" (chunk at offset {off})" if any(off) else "")


def check_resume(load_dir: str, iteration: Union[int, str, None], data_parallel_size: int,
                 need_rank_state: bool, need_loader: bool) -> Dict[str, Any]:
    """Start-up check of the checkpoint a run will load (before the model is built).

    ``need_rank_state``: the run resumes RNG states or the loader position (not --finetune);
    ``need_loader``: it resumes the loader position, which needs the saved data-parallel size.
    Weights-only checkpoints (no optimizer state) need neither. Returns the common state."""
    try:
        path = checkpoint_dir(load_dir, iteration)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from e
    common = verify_checkpoint(path)
    if not need_rank_state or "optimizer" not in saved_keys(path, common):
        return common  # weights only: nothing per rank is read
    layout = common.get("layout") or {}
    rdir = os.path.join(path, RANK_STATE_DIR)
    have = sorted(os.listdir(rdir)) if os.path.isdir(rdir) else []
    world = int(layout.get("world", 1))
    if len(have) < world:
        what = "no" if not have else f"{len(have)} of {world}"
        raise CheckpointError(
            f"{path}: {what} per-rank state files in {RANK_STATE_DIR}/ (RNG states and loader "
            "position): resuming would replay samples; load the weights only with --finetune, "
            "or pass --no-load-rng --no-load-loader-state to resume without them")
    saved_dp = layout.get("dp")
    if need_loader and saved_dp is not None and int(saved_dp) != data_parallel_size:
        raise CheckpointError(
            f"{path}: the loader state was saved at data-parallel size {saved_dp}, this run has "
            f"{data_parallel_size}; resuming the sample stream needs the same data-parallel "
            "size (or load with --finetune, or --no-load-loader-state)")
    return common


def saved_keys(path: str, common: Dict[str, Any]) -> set:
    """Top-level keys of the checkpoint at ``path`` (tensor keys' first part + common keys)."""
    keys = {k.split(".", 1)[0] for k in load_tensors_metadata(path)}
    return keys | set(common)


def check_shapes(request: Dict[str, Any], path: str):
    """Every ShardedTensor of ``request`` exists in the checkpoint with its global shape."""
    saved = load_tensors_metadata(path)
    for st in nested_values(request):
        if not isinstance(st, ShardedTensor):
            continue
        have = saved.get(st.key)
        if have is None:
            raise CheckpointError(f"{path}: no tensor {st.key} in the checkpoint (another "
                                  "architecture than the model's?)")
        if tuple(have.global_shape) != tuple(st.global_shape):
            raise CheckpointError(
                f"{path}: tensor {st.key} has shape {tuple(have.global_shape)} in the "
                f"checkpoint, the model expects {tuple(st.global_shape)}: the checkpoint "
                "holds another architecture (check --load and the model flags)")
