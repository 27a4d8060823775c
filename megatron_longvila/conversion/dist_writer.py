"""Write a LongVILA Megatron-Core dist checkpoint (torch_dist) one tensor at a time.

Megatron-Core's own ``dist_checkpointing.save`` needs the whole model in memory: its writer
resolves every tensor of the plan before writing. This writer produces the same format
without building the model:

- the *structure* (dist-checkpoint keys, the stacked layer axis, the ``_extra_state``
  sharded objects and their serialisation) is read off a tiny model of the same
  architecture (:func:`.sharded_index.sharded_key_index`), so it follows Megatron-Core, not a
  copy;
- the *global shapes* come from the HF tensor headers through the mapping rules (meta
  tensors, no data);
- the plan is handed to PyTorch DCP's ``FileSystemWriter`` with a planner whose
  ``resolve_data`` reads the HF tensor(s) of a parameter, maps them and returns the result
  just before that item is written (the writer's serial loader asks for one item at a time).

Tensors are stored at full size in model coordinates (one chunk per parameter, or per layer
of a stacked ``decoder.layers.*`` key), so the checkpoint loads at any tensor-parallel size:
Megatron-Core reshards on load. ``common.pt`` and ``metadata.json`` carry what
:func:`megatron_longvila.checkpoint.save_model_checkpoint` writes for a model-only checkpoint.
"""

import json
import os
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies.torch import mcore_to_pyt_state_dict
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata,
                                                   Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (BytesIOWriteData, SavePlan, SavePlanner,
                                                  TensorWriteData, WriteItem, WriteItemType)

from .. import checkpoint as ckpt
from ..utils.atomic import fsync_tree
from .hf_io import ConversionError
from .mapping import model_rules, to_mcore
from .report import progress_bar
from .sharded_index import sharded_key_index


def _shard_layout(cfg):
    """(param name -> (key, prepend axes, layer)), the twin's ShardedObjects."""
    index, twin_sd = sharded_key_index(cfg, return_state_dict=True)
    objects = [v for v in nested_values(twin_sd) if isinstance(v, ShardedObject)]
    return index, objects


def save_release_streaming(cfg, getters: Dict[str, Callable[[str], torch.Tensor]],
                           shapes: Dict[str, Callable[[str], Tuple[int, ...]]], dtype: torch.dtype,
                           save_dir: str, vision_hf_prefix: str = "",
                           fresh_projector: Optional[Dict[str, torch.Tensor]] = None,
                           progress: bool = True, tensor_parallel_size: int = 1) -> dict:
    """Write ``save_dir/release`` + tracker + longvila_config.json. Returns byte/tensor counts.

    ``getters[part](hf_name)`` reads one HF tensor, ``shapes[part](hf_name)`` its shape.
    ``fresh_projector``: projector tensors to store when the source has none.
    Needs an initialised one-rank world with model-parallel state (TP=1).
    """
    index, objects = _shard_layout(cfg)
    # Every Megatron parameter: where its data comes from and its full shape.
    sources = {}
    for mp, part, rules, heads, groups in model_rules(cfg, vision_hf_prefix=vision_hf_prefix):
        for rule in rules:
            name = mp + rule.mcore
            if part not in getters:
                if fresh_projector is None or rule.mcore not in fresh_projector:
                    raise ConversionError(f"{name}: no source tensor")
                shape = tuple(fresh_projector[rule.mcore].shape)
            else:
                metas = [torch.empty(shapes[part](n), device="meta") for n in rule.hf]
                shape = tuple(to_mcore(rule, metas, heads, groups).shape)
            sources[name] = (part, rule, heads, groups, shape)
    missing = [n for n in index if n not in sources]
    extra = [n for n in sources if n not in index]
    if missing or extra:
        raise ConversionError(f"mapping/model mismatch: no rule for {missing[:5]}, "
                              f"no parameter for {extra[:5]}")

    # The plan: one write item per parameter (per layer for stacked keys).
    props = TensorProperties(dtype=dtype)
    items, md, by_index = [], {}, {}
    stacked = {}
    for key, pre, layer in index.values():
        if pre:
            stacked[key] = stacked.get(key, 0) + 1
    for name, (key, pre, layer) in index.items():
        shape = sources[name][4]
        if pre:
            n_layers = stacked[key]
            gsize = torch.Size((n_layers,) + shape)
            offsets, sizes = torch.Size((layer,) + (0,) * len(shape)), torch.Size((1,) + shape)
        else:
            gsize, offsets, sizes = torch.Size(shape), torch.Size((0,) * len(shape)), torch.Size(shape)
        chunk = ChunkStorageMetadata(offsets=offsets, sizes=sizes)
        tmd = md.setdefault(key, TensorStorageMetadata(properties=props, size=gsize, chunks=[]))
        if tmd.size != gsize:
            raise ConversionError(f"{key}: inconsistent global shapes {tmd.size} / {gsize}")
        tmd.chunks.append(chunk)
        idx = MetadataIndex(fqn=key, offset=offsets)
        items.append(WriteItem(index=idx, type=WriteItemType.SHARD,
                               tensor_data=TensorWriteData(chunk=chunk, properties=props,
                                                           size=gsize)))
        by_index[(key, tuple(offsets))] = (name, pre)
    blobs = {}
    for obj in objects:
        pyt = mcore_to_pyt_state_dict({obj.unique_key: [obj]}, False)
        buf = pyt[obj.unique_key]
        blobs[obj.unique_key] = buf
        md[obj.unique_key] = BytesStorageMetadata()
        items.append(WriteItem(index=MetadataIndex(fqn=obj.unique_key), type=WriteItemType.BYTE_IO,
                               bytes_io_data=BytesIOWriteData(nbytes=len(buf.getbuffer()))))

    bar = progress_bar(len(index), "HF -> Megatron", progress)
    counts = {"read_bytes": 0, "written_tensor_bytes": 0}

    class LazyPlanner(SavePlanner):
        """Produces each tensor only when the writer asks for it."""

        def set_up_planner(self, *a, **k):
            pass

        def create_local_plan(self):
            return SavePlan(items)

        def create_global_plan(self, plans):
            return plans, Metadata(state_dict_metadata=md)

        def finish_plan(self, plan):
            return plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return blobs[write_item.index.fqn]
            name, pre = by_index[(write_item.index.fqn, tuple(write_item.index.offset))]
            part, rule, heads, groups, shape = sources[name]
            bar.set_postfix_str(name[-48:], refresh=False)
            if part in getters:
                ts = [getters[part](n) for n in rule.hf]
                counts["read_bytes"] += sum(t.numel() * t.element_size() for t in ts)
                t = to_mcore(rule, ts, heads, groups)
                del ts
            else:
                t = fresh_projector[rule.mcore]
            if tuple(t.shape) != shape:
                raise ConversionError(f"{name}: got shape {tuple(t.shape)}, expected {shape}")
            t = t.to(dtype).contiguous()
            counts["written_tensor_bytes"] += t.numel() * t.element_size()
            bar.update(1)
            return t.reshape((1,) * (1 if pre else 0) + shape)

    release = os.path.join(save_dir, ckpt.checkpoint_name(ckpt.RELEASE))
    os.makedirs(release)
    planner = LazyPlanner()
    writer = dcp.FileSystemWriter(release, single_file_per_rank=True, sync_files=True,
                                  thread_count=1, per_thread_copy_ahead=0)
    writer.set_up_storage_writer(True)
    local = writer.prepare_local_plan(planner.create_local_plan())
    (plan,) = writer.prepare_global_plan([local])
    t0 = time.time()
    results = writer.write_data(plan, planner).wait()
    bar.close()
    writer.finish(Metadata(state_dict_metadata=md), [results])
    # Megatron-Core's side files: the common (non-tensor) state and the backend tag.
    common = ckpt.model_common_state(ckpt.RELEASE, {"world": tensor_parallel_size,
                                                    "tp": tensor_parallel_size, "cp": 1,
                                                    "dp": 1, "pp": 1})
    torch.save(common, os.path.join(release, "common.pt"))
    with open(os.path.join(release, "metadata.json"), "w") as f:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                   "common_backend": "torch", "common_backend_version": 1}, f)
    fsync_tree(release)
    ckpt.write_config(save_dir, cfg)
    ckpt.write_tracker(save_dir, ckpt.RELEASE)
    counts["tensors"] = len(index)
    counts["write_seconds"] = time.time() - t0
    return counts
