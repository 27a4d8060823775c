"""A Megatron checkpoint (any layout that saved it) -> VILA's HF layout, one tensor at a time.

One Megatron tensor (one layer of a stacked key) at a time is read from the dist checkpoint at
full size, mapped, and appended to a streaming safetensors writer: peak memory is a few copies
of the largest tensor. Configs, tokenizer and image-processor files and unused HF tensors
carried in ``hf_assets/`` are written back unchanged, so HF -> Megatron -> HF is exact.
"""

import json
import os
import time
from typing import Dict, Optional

import torch
from megatron.core import parallel_state

from ..utils.atomic import OutputError, atomic_output_dir
from . import hf_io
from .assets import (ExtraReader, carried_config, copy_side_files, read_assets, torch_dtype,
                     write_image_processor)
from .hf_io import PARTS, ConversionError, StreamingSafetensorsWriter
from .hf_source import widest_dtype
from .mapping import model_rules, to_hf
from .megatron_reader import MegatronReader
from .report import log, peak_rss_bytes, progress_bar
from .workers import ensure_model_parallel, init_single_rank


def _hf_names_and_shapes(rule, full_shape, heads, groups):
    """The HF tensors a Megatron tensor of ``full_shape`` becomes, without computing them."""
    meta = torch.empty(full_shape, device="meta")
    return [(n, tuple(t.shape)) for n, t in zip(rule.hf, to_hf(rule, meta, heads, groups))]



def _set_dtype(d: dict, dtype: torch.dtype, add: bool = True) -> dict:
    """The config with its dtype entry set (added only if ``add``: a carried config that had
    none keeps none)."""
    d = dict(d)
    name = hf_io.HF_DTYPE_NAMES[dtype]
    for k in ("dtype", "torch_dtype"):
        if k in d:
            d[k] = name
    if add and "dtype" not in d and "torch_dtype" not in d:
        d["dtype"] = name
    return d


def convert_megatron_to_hf(load: str, save: str, dtype: Optional[str] = None, iteration=None,
                           num_video_frames: Optional[int] = None, tokenizer: Optional[str] = None,
                           overwrite: bool = False, progress: bool = True) -> dict:
    """Write VILA's HF layout from a Megatron checkpoint. Needs an initialised 1-rank world
    (the CLI makes one); reads every tensor at full size regardless of the saved layout."""
    t0 = time.time()
    if dtype is not None:
        hf_io.parse_dtype(dtype)
    init_single_rank()
    created = ensure_model_parallel(1)
    try:
        return _convert(load, save, dtype, iteration, num_video_frames, tokenizer, overwrite,
                        progress, t0)
    except OutputError as e:
        raise ConversionError(str(e)) from e
    finally:
        if created:
            parallel_state.destroy_model_parallel()


def _convert(load, save, dtype, iteration, num_video_frames, tokenizer, overwrite, progress, t0):
    reader = MegatronReader(load, iteration)
    cfg = reader.cfg
    adir, meta = read_assets(load)
    src_prefix = meta.get("vision_hf_prefix", "vision_model.")
    prefix = hf_io.EXPORT_VISION_PREFIX  # the names VILA's transformers 4.46 loads
    parts_rules = model_rules(cfg, vision_hf_prefix=prefix)

    def out_name(part, n):
        return hf_io.export_vision_name(n, src_prefix) if part == "vision_tower" else n
    # Plan every file's header first (names, shapes): all from metadata, no tensor data.
    shapes = {mp + rule.mcore: reader.full_shape(mp + rule.mcore)
              for mp, _part, rules, _h, _g in parts_rules for rule in rules}
    dtype_from_source = dtype is None
    if dtype is None:  # the checkpoint's own dtype: a default-flag round trip is exact
        dtype = widest_dtype([d for _s, d in shapes.values()], f"Megatron checkpoint {load}")
    tdtype = hf_io.parse_dtype(dtype)
    plan: Dict[str, list] = {p: [] for p in PARTS}
    for mp, part, rules, h, g in parts_rules:
        for rule in rules:
            shape, _ = shapes[mp + rule.mcore]
            plan[part] += [(n, s, tdtype) for n, s in _hf_names_and_shapes(rule, shape, h, g)]
    extras = {}
    for p in PARTS:
        ep = os.path.join(adir, p, "extra.safetensors")
        if os.path.isfile(ep):
            r = ExtraReader(ep)
            extras[p] = r
            plan[p] += [(out_name(p, n), r.shape(n), torch_dtype(r.st_dtype(n)))
                        for n in r.keys()]
    writers = {}
    total = sum(len(rules) for _m, _p, rules, _h, _g in parts_rules)
    with atomic_output_dir(save, overwrite=overwrite, inputs=[load, tokenizer]) as tmp:
        try:
            for p in PARTS:
                os.makedirs(os.path.join(tmp, p))
                writers[p] = StreamingSafetensorsWriter(os.path.join(tmp, p, "model.safetensors"),
                                                        plan[p])
            bar = progress_bar(total, "Megatron -> HF", progress)
            read_bytes = 0
            for mp, part, rules, h, g in parts_rules:
                for rule in rules:
                    name = mp + rule.mcore
                    bar.set_postfix_str(name[-48:], refresh=False)
                    t = reader.get(name)
                    read_bytes += t.numel() * t.element_size()
                    for hf_name, ht in zip(rule.hf, to_hf(rule, t, h, g)):
                        writers[part].write(hf_name, ht)
                    del t
                    bar.update(1)
            bar.close()
            for p, r in extras.items():
                for n in r.keys():
                    writers[p].write(out_name(p, n), r.get(n))
            for w in writers.values():
                w.close()
            written = sum(w.bytes for w in writers.values())
            # Configs: the carried ones where they still describe the model, else fresh ones.
            head = any(out_name("vision_tower", n).startswith(prefix + "head.") for n in
                       (extras["vision_tower"].keys() if "vision_tower" in extras else []))
            fresh = {"llm": lambda: hf_io.hf_llm_config(cfg.llm, tdtype).to_dict(),
                     "vision_tower": lambda: hf_io.hf_vision_config(cfg.vision, tdtype,
                                                                    use_head=head).to_dict(),
                     "mm_projector": lambda: hf_io.hf_projector_config(cfg.projector_type, tdtype)}
            part_d, changed = {}, {}
            for p in PARTS:
                carried = carried_config(adir, p, cfg)
                d = (_set_dtype(carried, tdtype, add=False) if carried is not None
                     else _set_dtype(fresh[p](), tdtype))
                changed[p] = carried is None or d != carried
                part_d[p] = d = hf_io.export_part_config(p, d, cfg)  # forms all versions read
                with open(os.path.join(tmp, p, "config.json"), "w") as f:
                    json.dump(d, f, indent=2, sort_keys=True)
            top_p = os.path.join(adir, "config.json")
            if os.path.isfile(top_p):
                top = hf_io._load_json(top_p)
                for p, key in (("llm", "llm_cfg"), ("vision_tower", "vision_tower_cfg"),
                               ("mm_projector", "mm_projector_cfg")):
                    if changed[p] or top.get(key) is None:
                        top[key] = dict(part_d[p], _name_or_path=f"./{p}")
                    else:
                        top[key] = hf_io.export_part_config(p, top[key], cfg)
                top.update(hidden_size=cfg.llm.hidden_size, mm_hidden_size=cfg.vision.hidden_size,
                           mm_vision_select_layer=cfg.vision_select_layer,
                           mm_vision_select_feature=cfg.vision_select_feature)
                if "model_dtype" in top:
                    top["model_dtype"] = f"torch.{hf_io.HF_DTYPE_NAMES[tdtype]}"
                if num_video_frames is not None:
                    top["num_video_frames"] = num_video_frames
            else:
                top = hf_io.vila_top_config(cfg, part_d["llm"], part_d["vision_tower"],
                                            part_d["mm_projector"], tdtype, num_video_frames or 8)
            top = hf_io.export_top_config(top, tdtype)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(top, f, indent=2, sort_keys=True)
            warning = hf_io.token_order_warning(cfg)
            if warning:
                log(warning)
            # Side files: tokenizer (+ generation config), image processor.
            tok_src = tokenizer or os.path.join(adir, "llm")
            got = copy_side_files(tok_src, os.path.join(tmp, "llm"), hf_io.SIDE_FILES["llm"])
            if not any(n in hf_io.TOKENIZER_FILES for n in got):
                log("warning: no tokenizer files carried in the Megatron checkpoint (or --tokenizer); "
                    "llm/ has no tokenizer")
            hf_io.export_tokenizer_files(os.path.join(tmp, "llm"))  # transformers 4.46 reads it
            got = copy_side_files(os.path.join(adir, "vision_tower"), os.path.join(tmp, "vision_tower"),
                                   hf_io.SIDE_FILES["vision_tower"])
            if not got:
                write_image_processor(cfg, os.path.join(tmp, "vision_tower"))
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
    return {"direction": "megatron_to_hf", "tensors": total,
            "hf_tensors_written": sum(len(v) for v in plan.values()),
            "read_bytes": read_bytes, "written_bytes": written, "dtype": dtype,
            "dtype_from_source": dtype_from_source,
            "seconds": time.time() - t0, "peak_rss_bytes": peak_rss_bytes(),
            "save": os.path.abspath(save)}

