"""HF (VILA layout, or plain model folders) -> a Megatron-Core dist checkpoint ``SAVE/release``.

Default: the streaming writer (:mod:`.dist_writer`), one process, one tensor in memory at a
time; the checkpoint holds full tensors and loads at any TP size. ``build_model``: the
TP-sharded LongVILAModel is built in ``tensor_parallel_size`` gloo processes, filled one HF
tensor at a time, and saved with Megatron-Core's ``dist_checkpointing.save`` (memory: the
model once, spread over the processes).
"""

import json
import os
import time
from typing import Dict, Optional

import torch
from megatron.core import parallel_state

from .. import cpu_compat
from ..checkpoint import save_model_checkpoint
from ..models import LongVILAModel
from ..models.config import LongVILAConfig
from ..models.projector import MultimodalProjector
from ..utils.atomic import OutputError, atomic_output_dir
from . import hf_io
from .assets import ASSETS, ASSETS_META, copy_side_files, dir_bytes, write_extras
from .dist_writer import save_release_streaming
from .hf_io import PARTS, ConversionError, SafetensorsFolder
from .hf_source import HFSource, check_hf_tensors, open_hf_source, source_dtype
from .mapping import model_rules, to_mcore
from .report import log, peak_rss_bytes, progress_bar
from .tp import shard_full_tensor
from .workers import ensure_model_parallel, init_single_rank, run_ranks


def convert_hf_to_megatron(save: str, hf_path: Optional[str] = None, llm_path: Optional[str] = None,
                           vision_path: Optional[str] = None, tensor_parallel_size: int = 1,
                           dtype: Optional[str] = None, projector_type: Optional[str] = None,
                           vision_select_layer: Optional[int] = None, seed: int = 1234,
                           overwrite: bool = False, in_process: bool = False,
                           progress: bool = True, build_model: bool = False) -> dict:
    """Convert; returns a summary dict. On any error nothing is left at ``save``.

    ``dtype``: of the Megatron weights (``bf16``/``fp16``/``fp32``); None: the source's (a
    float32 checkpoint stays float32, so a default-flag round trip is exact).
    """
    t0 = time.time()
    if dtype is not None:
        hf_io.parse_dtype(dtype)
    if tensor_parallel_size < 1:
        raise ConversionError(f"--tensor-model-parallel-size must be >= 1, got {tensor_parallel_size}")
    src = open_hf_source(hf_path, llm_path, vision_path, projector_type, vision_select_layer)
    cfg = src.cfg
    tp = tensor_parallel_size
    for what, n in (("vocab size", cfg.llm.vocab_size), ("attention heads", cfg.llm.num_attention_heads),
                    ("query groups", cfg.llm.num_query_groups), ("ffn hidden size", cfg.llm.ffn_hidden_size),
                    ("vision attention heads", cfg.vision.num_attention_heads),
                    ("vision intermediate size", cfg.vision.intermediate_size)):
        if n % tp:
            raise ConversionError(f"the {what} ({n}) is not divisible by the tensor model "
                                  f"parallel size {tp}")
    extras = check_hf_tensors(src)
    dtype_from_source = dtype is None
    if dtype is None:
        dtype = source_dtype(src)
    inputs = [hf_path, llm_path, vision_path] + [d for d in src.dirs.values() if d]
    try:
        with atomic_output_dir(save, overwrite=overwrite, inputs=inputs) as tmp:
            if build_model:
                results = run_ranks(_hf_to_mcore_worker, tp, src.spec(), cfg.to_dict(), dtype,
                                    tmp, seed, progress, in_process=in_process and tp == 1)
            else:
                results = [_stream_to_megatron(src, dtype, tmp, seed, progress, tp)]
            extra_bytes = _write_assets(src, extras, tmp, hf_path, dtype, tp)
    except OutputError as e:
        raise ConversionError(str(e)) from e
    finally:
        for r in src.readers.values():
            r.close()
    n_tensors = sum(len(rules) for _m, part, rules, _h, _g in
                    model_rules(cfg, vision_hf_prefix=src.vision_hf_prefix) if part in src.readers)
    return {"direction": "hf_to_megatron", "tensors": n_tensors,
            "writer": "megatron-core save (model built)" if build_model else "streaming",
            "hf_tensors_read": sum(len(r.keys()) for r in src.readers.values()),
            "extra_tensors": sum(len(v) for v in extras.values()),
            "read_bytes": results[0]["read_bytes"] + extra_bytes,
            "written_bytes": dir_bytes(save), "tensor_model_parallel_size": tp,
            "dtype": dtype, "dtype_from_source": dtype_from_source,
            "seconds": time.time() - t0,
            "projector_initialized": not ("mm_projector" in src.readers),
            "peak_rss_bytes": max([peak_rss_bytes()] + [r["peak_rss"] for r in results]),
            "save": os.path.abspath(save)}


def _write_assets(src: HFSource, extras, out: str, hf_path, dtype: str, tp: int) -> int:
    """What the Megatron checkpoint has no place for, for the way back. Returns bytes read."""
    assets = os.path.join(out, ASSETS)
    os.makedirs(assets)
    extra_bytes, carried = 0, {}
    for p, names in extras.items():
        if names:
            os.makedirs(os.path.join(assets, p), exist_ok=True)
            extra_bytes += write_extras(src.readers[p], names,
                                        os.path.join(assets, p, "extra.safetensors"))
            log(f"note: {p}: {len(names)} HF tensor(s) unused by LongVILAModel carried in "
                f"{ASSETS}/{p}/extra.safetensors: {', '.join(names[:4])}"
                f"{' ...' if len(names) > 4 else ''}")
    for p in PARTS:
        if src.part_configs[p] is not None:
            os.makedirs(os.path.join(assets, p), exist_ok=True)
            with open(os.path.join(assets, p, "config.json"), "w") as f:
                json.dump(src.part_configs[p], f, indent=2)
        carried[p] = copy_side_files(src.dirs[p], os.path.join(assets, p), hf_io.SIDE_FILES[p])
    if src.top_config is not None:
        with open(os.path.join(assets, "config.json"), "w") as f:
            json.dump(src.top_config, f, indent=2)
    if not any(n in hf_io.TOKENIZER_FILES for n in carried["llm"]):
        log(f"warning: no tokenizer files in {src.dirs['llm']}; the Megatron checkpoint "
            "carries no tokenizer")
    meta = {"vision_hf_prefix": src.vision_hf_prefix,
            "source": os.path.abspath(hf_path or src.dirs["llm"]),
            "projector_converted": "mm_projector" in src.readers,
            "source_dtypes": {p: sorted({r.st_dtype(n) for n in r.keys()})
                              for p, r in src.readers.items()},
            "extras": extras, "dtype": dtype, "tensor_model_parallel_size": tp}
    with open(os.path.join(assets, ASSETS_META), "w") as f:
        json.dump(meta, f, indent=2)
    return extra_bytes


def fresh_projector_state(cfg: LongVILAConfig, seed: int) -> Dict[str, torch.Tensor]:
    """The projector a source without one starts from: VILA's module, default init, seeded."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    proj = MultimodalProjector(cfg.projector_type, cfg.vision.hidden_size, cfg.llm.hidden_size,
                               cfg.projector_token_order)
    torch.set_rng_state(state)
    return {k: v.detach() for k, v in proj.state_dict().items()}


def _stream_to_megatron(src: HFSource, dtype: str, out_dir: str, seed: int, progress: bool,
                        tp: int) -> dict:
    init_single_rank()
    created = ensure_model_parallel(1)
    try:
        shapes = {p: r.shape for p, r in src.readers.items()}
        fresh = None if "mm_projector" in src.readers else fresh_projector_state(src.cfg, seed)
        counts = save_release_streaming(src.cfg, src.getters(), shapes, hf_io.parse_dtype(dtype),
                                        out_dir, vision_hf_prefix=src.vision_hf_prefix,
                                        fresh_projector=fresh, progress=progress,
                                        tensor_parallel_size=tp)
    finally:
        if created:
            parallel_state.destroy_model_parallel()
    counts["peak_rss"] = peak_rss_bytes()
    return counts


def _hf_to_mcore_worker(rank, world, spec, cfg_dict, dtype_name, out_dir, seed, show_progress):
    """One TP rank: build the model, fill it one HF tensor at a time, save collectively."""
    dtype = hf_io.parse_dtype(dtype_name)
    cfg = LongVILAConfig.from_dict(cfg_dict)
    created = ensure_model_parallel(world)
    try:
        cpu_compat.model_parallel_seed(seed)
        model = LongVILAModel(cfg, dtype=dtype)
        params = dict(model.named_parameters())
        readers = {p: SafetensorsFolder(d) for p, d in spec["dirs"].items()}
        todo = [(mp, part, rule, h, g) for mp, part, rules, h, g in
                model_rules(cfg, vision_hf_prefix=spec["vision_hf_prefix"])
                for rule in rules if part in readers]
        bar = progress_bar(len(todo), "HF -> Megatron", show_progress and rank == 0)
        n_read = 0
        filled = set()
        with torch.no_grad():
            for mp, part, rule, h, g in todo:
                name = mp + rule.mcore
                bar.set_postfix_str(name[-48:], refresh=False)
                tensors = []
                for hf_name in rule.hf:
                    if hf_name not in readers[part]:
                        raise ConversionError(f"{part}: missing tensor {hf_name}")
                    t = readers[part].get(hf_name)
                    n_read += t.numel() * t.element_size()
                    tensors.append(t)
                full = to_mcore(rule, tensors, h, g).to(dtype)
                del tensors
                p = params.get(name)
                if p is None:
                    raise ConversionError(f"{name}: the Megatron model has no such parameter")
                shard = shard_full_tensor(model, name, p, full)
                if shard.shape != p.shape:
                    raise ConversionError(f"{name} (from {', '.join(rule.hf)}): shard shape "
                                          f"{tuple(shard.shape)}, the model holds {tuple(p.shape)}")
                p.data.copy_(shard)
                filled.add(name)
                del full, shard
                bar.update(1)
        bar.close()
        if "mm_projector" not in readers:
            with torch.no_grad():
                for k, v in fresh_projector_state(cfg, seed).items():
                    params["projector." + k].data.copy_(v.to(dtype))
                    filled.add("projector." + k)
        not_filled = [n for n in params if n not in filled]
        if any(not n.startswith("projector.") for n in not_filled):
            raise ConversionError(f"parameters with no HF source: {not_filled[:5]}")
        for r in readers.values():
            r.close()
        save_model_checkpoint(model, out_dir, config=cfg)
        n_params = sum(p.numel() for p in params.values())
        return {"read_bytes": n_read, "filled": len(filled), "unfilled": not_filled,
                "shard_numel": n_params, "peak_rss": peak_rss_bytes()}
    finally:
        if created:
            parallel_state.destroy_model_parallel()
