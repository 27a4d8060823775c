"""megatron-energon metadatasets as ``--data-path``: the blend a Megatron multimodal user
already has, read by this project's loader.

An energon metadataset (``__class__: MetadatasetV2`` YAML) names datasets by path (relative to
the YAML file) and, under ``blend:``, gives each a weight; a path may itself be a metadataset
(weights multiply down the tree). ``expand_metadataset(path, split)`` turns it into this
project's weighted list ``[(dataset directory, weight)]``, so the datasets are read by the same
loader as shard directories (same samples, blending by weight, exact resume through the
loader state in our checkpoints). Only what the loader can honour is accepted: ``blend`` and
plain references; ``blend_epochized``, ``join``, subsets, sample ratios and subflavors are
refused with a message naming the file and key (never silently ignored).
"""

from __future__ import annotations

import os
from typing import List, Tuple

META_SUFFIXES = (".yaml", ".yml")
_REF_KEYS = {"path", "weight", "split_part"}


def is_metadataset(path: str) -> bool:
    return str(path).endswith(META_SUFFIXES) and os.path.isfile(str(path))


def expand_metadataset(path: str, split: str = "train", _depth: int = 0) -> List[Tuple[str, float]]:
    """``[(dataset directory, weight)]`` of the metadataset's ``split`` (weights sum to 1)."""
    import yaml
    if _depth > 16:
        raise ValueError(f"{path}: metadatasets nested more than 16 deep (a cycle?)")
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read the metadataset {path}: {e}") from e
    if not isinstance(doc, dict) or doc.get("__class__") != "MetadatasetV2":
        raise ValueError(f"{path}: not an energon metadataset (expected __class__: MetadatasetV2, "
                         f"got {None if not isinstance(doc, dict) else doc.get('__class__')!r})")
    splits = doc.get("splits") or {}
    if split not in splits:
        raise ValueError(f"{path}: no split {split!r} (splits: {sorted(splits)})")
    return _node(splits[split], path, f"splits.{split}", split, _depth)


def _node(node, path: str, where: str, split: str, depth: int) -> List[Tuple[str, float]]:
    base = os.path.dirname(os.path.abspath(path))
    if not isinstance(node, dict):
        raise ValueError(f"{path}: {where} is not a mapping")
    if "blend" in node:
        extra = set(node) - {"blend"}
        if extra:
            raise ValueError(f"{path}: {where}: keys {sorted(extra)} next to 'blend' are not "
                             f"supported by this loader")
        out = []
        total = 0.0
        for k, ref in enumerate(node["blend"] or []):
            w = float(ref.get("weight", 1.0)) if isinstance(ref, dict) else 1.0
            if w < 0:
                raise ValueError(f"{path}: {where}.blend[{k}]: negative weight {w}")
            total += w
            out.extend((p, w * iw) for p, iw in _node(ref, path, f"{where}.blend[{k}]", split, depth))
        if total <= 0:
            raise ValueError(f"{path}: {where}: the blend's weights sum to 0")
        return [(p, w / total) for p, w in out]
    for key in ("blend_epochized", "join", "subset", "sample_ratio", "subflavors", "shuffle_over_epochs_multiplier"):
        if key in node:
            raise ValueError(f"{path}: {where}: '{key}' is not supported by this loader "
                             f"(supported: blend with weights, dataset paths)")
    if "path" not in node:
        raise ValueError(f"{path}: {where}: no 'path' (keys: {sorted(node)})")
    extra = set(node) - _REF_KEYS
    if extra:
        raise ValueError(f"{path}: {where}: unsupported keys {sorted(extra)}")
    target = node["path"]
    if not os.path.isabs(target):
        target = os.path.join(base, target)
    target = os.path.normpath(target)
    part = node.get("split_part", split)
    if is_metadataset(target):
        return expand_metadataset(target, part, depth + 1)
    if not os.path.isdir(target):
        raise ValueError(f"{path}: {where}: dataset {target} does not exist")
    if part != "train":
        raise ValueError(f"{path}: {where}: split_part {part!r}: only 'train' is read here")
    return [(target, 1.0)]
