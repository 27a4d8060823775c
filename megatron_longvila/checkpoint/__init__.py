"""The checkpoint format: Megatron-LM's directory layout, Megatron-Core dist checkpointing inside.

Below training, conversion and evaluation (it imports none of them); they use it through the
public names here. Layout of a save directory ``SAVE``::

    SAVE/latest_checkpointed_iteration.txt   "100" (or "release"): the last complete checkpoint
    SAVE/longvila_config.json                LongVILAConfig.to_dict(): the architecture
    SAVE/iter_0000100/                       a Megatron-Core dist checkpoint (torch_dist) of
        {"model": model.sharded_state_dict(),           always
         "optimizer": optimizer.sharded_state_dict(),   training checkpoints
         "opt_param_scheduler", "iteration", "args", "layout", "consumed"}   (common state)
    SAVE/iter_0000100/longvila_rank_state/rank_00003.json
                                             per-rank JSON state (the trainer keeps RNG states
                                             and the data-loader position there; nothing from a
                                             checkpoint is ever unpickled by us)
    SAVE/release/                            a model-only checkpoint (converted HF weights)

Model and optimizer are sharded tensors in the model's full (unsharded) coordinate space, so a
checkpoint loads at another tensor/sequence/data-parallel layout. The distributed optimizer's
state is saved in one of Megatron-Core's formats (``OPTIM_SHARDING_TYPES``): by default
dp_reshardable (loads at another DP/SP size, the same TP), or fully_reshardable (any layout).

Crash safety (:mod:`megatron_longvila.utils.atomic`): a checkpoint is written into
``SAVE/.tmp_iter_0000100`` (files fsynced), renamed to ``iter_0000100`` and only then named by
the tracker file (written to a temporary file, fsynced, renamed). A crash at any point leaves
the tracker naming the previous complete checkpoint; leftovers of an interrupted save are
removed by the next save.

Bad input (:mod:`.verify`): a missing or truncated ``.distcp``, an unreadable ``common.pt``,
another architecture's tensors, an unwritable or full save directory, a training checkpoint
without its per-rank state: each a :class:`CheckpointError` with one line naming the file or
tensor; start-up checks (:func:`check_save_dir`, :func:`check_resume`,
:func:`check_no_orphans`) find them before a model is built.

What the trainer adds (optimizer, scheduler, RNG, loader) is assembled in
``training/checkpointing.py`` on top of :func:`save_sharded` / :func:`load_sharded`.
"""

from .files import (CONFIG_FILE, FORMAT_VERSION, RANK_STATE_DIR, RELEASE, TRACKER_FILE,
                    checkpoint_dir, checkpoint_name, has_checkpoint, read_checkpoint_config,
                    read_tracker, write_config, write_tracker)
from .sharded import (OPTIM_SHARDING_TYPES, barrier, current_layout, layout_ranks, load_model_into, load_model_weights,
                      load_sharded, model_common_state, model_sharded_state_dict, prune, rank,
                      read_common_state, read_rank_state, save_model_checkpoint, save_sharded,
                      sharded_metadata, unwrap_model)
from .verify import (FAILURES, CheckpointError, check_no_orphans, check_resume, check_save_dir,
                     check_shapes, orphaned_iterations, root_cause, saved_keys,
                     verify_checkpoint)

__all__ = [
    "CONFIG_FILE", "FORMAT_VERSION", "RANK_STATE_DIR", "RELEASE", "TRACKER_FILE",
    "checkpoint_dir", "checkpoint_name", "has_checkpoint", "read_checkpoint_config",
    "read_tracker", "write_config", "write_tracker", "OPTIM_SHARDING_TYPES", "barrier", "current_layout", "layout_ranks",
    "load_model_into", "load_model_weights", "load_sharded", "model_common_state",
    "model_sharded_state_dict", "prune", "rank", "read_common_state", "read_rank_state",
    "save_model_checkpoint", "save_sharded", "saved_keys", "sharded_metadata", "unwrap_model",
    "FAILURES", "CheckpointError", "check_no_orphans", "check_resume", "check_save_dir",
    "check_shapes", "orphaned_iterations", "root_cause", "verify_checkpoint",
]
