"""``SAVE/hf_assets/``: what a Megatron checkpoint has no place for but the way back needs.

The HF configs as written, tokenizer and image-processor files, HF tensors LongVILAModel does
not use (SigLIP's ``head.*``, ...) in ``PART/extra.safetensors``, and ``conversion.json``
(the HF name prefix of the vision tower, the source's dtypes, ...).
"""

import dataclasses
import os
import shutil
from typing import List, Optional

import torch

from ..models.config import LongVILAConfig
from . import hf_io
from .hf_io import ConversionError, SafetensorsFolder, StreamingSafetensorsWriter
from .report import log

ASSETS = "hf_assets"
ASSETS_META = "conversion.json"

_FROM_ST = {v: k for k, v in hf_io._ST_DTYPES.items()}


def torch_dtype(st: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"F32"``, ``"BF16"``, ...)."""
    if st not in _FROM_ST:
        raise ConversionError(f"unsupported safetensors dtype {st}")
    return _FROM_ST[st]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(path) for f in fs)


def copy_side_files(src_dir: Optional[str], dst_dir: str, names) -> List[str]:
    """Copy those of ``names`` that exist in ``src_dir``; returns the names copied."""
    copied = []
    if not src_dir:
        return copied
    for n in names:
        s = os.path.join(src_dir, n)
        if os.path.isfile(s):
            os.makedirs(dst_dir, exist_ok=True)
            shutil.copy2(s, os.path.join(dst_dir, n))
            copied.append(n)
    return copied


def write_extras(reader: SafetensorsFolder, names: List[str], path: str) -> int:
    """Copy the tensors ``names`` of ``reader`` into the safetensors file ``path``; bytes."""
    entries = [(n, reader.shape(n), torch_dtype(reader.st_dtype(n))) for n in names]
    w = StreamingSafetensorsWriter(path, entries)
    try:
        for n in names:
            w.write(n, reader.get(n))
    except BaseException:
        w.abort()
        raise
    w.close()
    return w.bytes


class ExtraReader(SafetensorsFolder):
    """One carried ``extra.safetensors`` file, read like a folder."""

    def __init__(self, path):
        self.folder = os.path.dirname(path)
        self.file_of = None
        self._single = path
        self._handles = {}
        self._meta = {k: v[:2] + (path,) + v[2:] for k, v in hf_io._read_header(path).items()}


def read_assets(load: str):
    """``(hf_assets folder, its conversion.json as a dict ({} if absent))``."""
    adir = os.path.join(load, ASSETS)
    meta = {}
    if os.path.isfile(os.path.join(adir, ASSETS_META)):
        meta = hf_io._load_json(os.path.join(adir, ASSETS_META))
    return adir, meta


def carried_config(adir: str, part: str, cfg: LongVILAConfig) -> Optional[dict]:
    """The HF config carried from the source, if it still describes this architecture."""
    p = os.path.join(adir, part, "config.json")
    if not os.path.isfile(p):
        return None
    d = hf_io._load_json(p)
    try:
        if part == "llm" and dataclasses.replace(  # a new RoPE base/length is written in
                hf_io.llm_config_from_hf(d), rope_base=cfg.llm.rope_base,
                max_position_embeddings=cfg.llm.max_position_embeddings) != cfg.llm:
            raise ConversionError("differs")
        if part == "vision_tower" and hf_io.vision_config_from_hf(d) != cfg.vision:
            raise ConversionError("differs")
        if part == "mm_projector" and d.get("mm_projector_type") != cfg.projector_type:
            raise ConversionError("differs")
    except ConversionError:
        log(f"warning: the carried {part} config no longer matches longvila_config.json; "
            "writing a fresh one")
        return None
    return d


def write_image_processor(cfg: LongVILAConfig, folder: str):
    """SigLIP's image processor at the model's resolution (when none was carried)."""
    # imported here: transformers prints a torchvision notice when this class is first touched
    from transformers import SiglipImageProcessor
    s = cfg.vision.image_size
    SiglipImageProcessor(size={"height": s, "width": s}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(folder)
