"""Full tensors of a LongVILA Megatron checkpoint, one at a time, whatever layout saved it."""

import os
from typing import Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from .. import checkpoint as ckpt
from . import hf_io
from .hf_io import ConversionError
from .sharded_index import sharded_key_index


class MegatronReader:
    """Full tensors of a LongVILA Megatron checkpoint, one at a time (any saved TP layout).

    Reads the region of one parameter (e.g. layer 7 of a stacked ``decoder.layers.*`` key)
    straight from the torch_dist (PyTorch DCP) files, whatever chunks the saving ranks wrote.
    """

    def __init__(self, load: str, iteration=None):
        if not os.path.isdir(load):
            raise ConversionError(f"Megatron checkpoint directory {load!r} does not exist")
        try:
            self.path = ckpt.checkpoint_dir(load, iteration)
        except (FileNotFoundError, ValueError) as e:
            raise ConversionError(str(e)) from e
        self.cfg = ckpt.read_checkpoint_config(load)
        if self.cfg is None:
            raise ConversionError(f"missing file {os.path.join(load, ckpt.CONFIG_FILE)}")
        try:
            ckpt.verify_checkpoint(self.path)  # every file and byte range the metadata names
        except ckpt.CheckpointError as e:
            raise ConversionError(str(e)) from e
        backend = hf_io._load_json(os.path.join(self.path, "metadata.json"))
        if backend.get("sharded_backend") != "torch_dist":
            raise ConversionError(f"{self.path}: sharded backend {backend.get('sharded_backend')!r}"
                                  " is not supported (torch_dist)")
        self.reader = dcp.FileSystemReader(self.path)
        self.meta = self.reader.read_metadata().state_dict_metadata
        self.index = sharded_key_index(self.cfg)

    def _key(self, name):
        if name not in self.index:
            raise ConversionError(f"{name}: not a parameter of the model in longvila_config.json")
        key, pre, layer = self.index[name]
        if key not in self.meta:
            raise ConversionError(f"{self.path}: missing tensor {key} (for {name})")
        return key, pre, layer

    def full_shape(self, name: str) -> Tuple[Tuple[int, ...], torch.dtype]:
        key, pre, _ = self._key(name)
        m = self.meta[key]
        return tuple(m.size[pre:]), m.properties.dtype

    def get(self, name: str) -> torch.Tensor:
        key, pre, layer = self._key(name)
        m = self.meta[key]
        shape = tuple(m.size[pre:])
        region = torch.empty((1,) * pre + shape, dtype=m.properties.dtype)
        offsets = ([layer] if pre else []) + [0] * len(shape)
        try:
            dcp.load({key: region}, storage_reader=self.reader,
                     planner=RegionLoadPlanner({key: (offsets, region)}))
        except ckpt.FAILURES as e:  # a damaged file: name the tensor, one line
            raise ConversionError(f"{self.path}: cannot read tensor {key} (for {name}): "
                                  f"{ckpt.root_cause(e)}") from e
        return region.reshape(shape)


class RegionLoadPlanner(DefaultLoadPlanner):
    """Loads a sub-region (offsets, shape) of a checkpointed global tensor into a tensor.

    ``regions``: ``{key: (offsets, destination tensor)}``."""

    def __init__(self, regions):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions

    def create_local_plan(self):
        items = []
        for fqn, (offsets, t) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=t.size())
            items += create_read_items_for_chunk_list(
                fqn, self.metadata.state_dict_metadata[fqn], [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index):
        return self.regions[index.fqn][1]
