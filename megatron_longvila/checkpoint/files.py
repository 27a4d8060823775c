"""Names and small files of a checkpoint directory: tracker, config, iteration folders."""

import json
import os
from typing import Optional, Union

from ..models.config import LongVILAConfig
from ..utils.atomic import atomic_write_text

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "longvila_config.json"
RANK_STATE_DIR = "longvila_rank_state"
RELEASE = "release"
FORMAT_VERSION = 1


def checkpoint_name(iteration: Union[int, str]) -> str:
    return RELEASE if iteration == RELEASE else f"iter_{int(iteration):07d}"


def read_tracker(load_dir: str) -> Union[int, str]:
    """The iteration (int) or ``"release"`` named by ``load_dir``'s tracker file."""
    path = os.path.join(load_dir, TRACKER_FILE)
    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"checkpoint directory {load_dir!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{load_dir!r} holds no {TRACKER_FILE}: not a checkpoint "
                                "directory (or no checkpoint was completed there)")
    with open(path) as f:
        text = f.read().strip()
    if text == RELEASE:
        return RELEASE
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number or 'release', got {text!r}")


def write_tracker(save_dir: str, iteration: Union[int, str]):
    """Name ``iteration`` as the last complete checkpoint of ``save_dir`` (atomically)."""
    atomic_write_text(os.path.join(save_dir, TRACKER_FILE), f"{iteration}\n")


def checkpoint_dir(load_dir: str, iteration: Union[int, str, None] = None) -> str:
    """The directory of the checkpoint to load (the tracker's, unless ``iteration`` given)."""
    it = read_tracker(load_dir) if iteration is None else iteration
    path = os.path.join(load_dir, checkpoint_name(it))
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise FileNotFoundError(f"checkpoint {path!r} is missing or incomplete")
    return path


def has_checkpoint(load_dir: Optional[str]) -> bool:
    return bool(load_dir) and os.path.isfile(os.path.join(load_dir, TRACKER_FILE))


def write_config(save_dir: str, config):
    """``save_dir/longvila_config.json`` from a LongVILAConfig (or a dict); None: nothing."""
    if config is None:
        return
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    atomic_write_text(os.path.join(save_dir, CONFIG_FILE), json.dumps(d, indent=2) + "\n")


def read_checkpoint_config(load_dir: str):
    """The LongVILAConfig a checkpoint directory was saved with (or None if absent)."""
    path = os.path.join(load_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return LongVILAConfig.from_dict(json.load(f))
