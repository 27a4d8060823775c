"""The Hugging Face side of HF -> Megatron: a VILA folder (or plain model folders) opened and
checked up front (configs, tensor names and shapes; no tensor data read)."""

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..models.config import LongVILAConfig
from . import hf_io
from .assets import torch_dtype
from .hf_io import PARTS, ConversionError, SafetensorsFolder
from .mapping import model_rules


@dataclass
class HFSource:
    """An HF checkpoint as the converter sees it: per-part folders, configs, lazy tensors."""

    cfg: LongVILAConfig
    dirs: Dict[str, Optional[str]]           # part -> folder (None: part not given)
    part_configs: Dict[str, Optional[dict]]  # part -> its config.json as read
    top_config: Optional[dict]               # VILA's top-level config.json (None for parts)
    vision_hf_prefix: str = ""
    readers: Dict[str, SafetensorsFolder] = field(default_factory=dict)

    def getters(self):
        def make(part):
            def get(name):
                r = self.readers[part]
                if name not in r:
                    raise ConversionError(f"{part}: missing tensor {name} in {r.folder}")
                return r.get(name)
            return get
        return {p: make(p) for p in self.readers}

    def spec(self):
        """Picklable description, to reopen the readers in worker processes."""
        return {"dirs": {p: d for p, d in self.dirs.items() if p in self.readers},
                "vision_hf_prefix": self.vision_hf_prefix}


def _is_vila_dir(path):
    p = os.path.join(path, "config.json")
    if not os.path.isfile(p):
        return False
    d = hf_io._load_json(p)
    return "llm_cfg" in d or os.path.isdir(os.path.join(path, "llm"))


def _part_config(folder: str, fallback: Optional[dict], part: str) -> dict:
    p = os.path.join(folder, "config.json")
    if os.path.isfile(p):
        return hf_io._load_json(p)
    if fallback:
        return dict(fallback)
    raise ConversionError(f"missing file {p} (and no {part} config in the top-level config.json)")


def open_hf_source(hf_path: Optional[str] = None, llm_path: Optional[str] = None,
                   vision_path: Optional[str] = None, projector_type: Optional[str] = None,
                   vision_select_layer: Optional[int] = None,
                   vision_select_feature: Optional[str] = None) -> HFSource:
    """Read configs and tensor headers (no tensor data) and check everything up front."""
    dirs: Dict[str, Optional[str]] = {p: None for p in PARTS}
    top = None
    if hf_path is not None:
        if not os.path.isdir(hf_path):
            raise ConversionError(f"HF checkpoint directory {hf_path!r} does not exist")
        if _is_vila_dir(hf_path):
            top = hf_io._load_json(os.path.join(hf_path, "config.json"))
            for p in PARTS:
                d = os.path.join(hf_path, p)
                if not os.path.isdir(d):
                    raise ConversionError(f"missing directory {d} (VILA layout: llm/, "
                                          "vision_tower/, mm_projector/)")
                dirs[p] = d
        else:
            d = hf_io._load_json(os.path.join(hf_path, "config.json"))
            archs = d.get("architectures") or [d.get("model_type")]
            if set(archs) & set(hf_io.VISION_ARCHS) or d.get("model_type") == "siglip_vision_model":
                dirs["vision_tower"] = hf_path
            else:
                hf_io.llm_family(d, os.path.join(hf_path, "config.json"))
                dirs["llm"] = hf_path
    if llm_path is not None:
        dirs["llm"] = llm_path
    if vision_path is not None:
        dirs["vision_tower"] = vision_path
    for p in ("llm", "vision_tower"):
        if dirs[p] is None:
            raise ConversionError(f"no {p} given: pass a VILA checkpoint (--hf-path) or the plain "
                                  f"model folders (--llm-path and --vision-path)")
        if not os.path.isdir(dirs[p]):
            raise ConversionError(f"{p} directory {dirs[p]!r} does not exist")
    fallbacks = {"llm": (top or {}).get("llm_cfg"),
                 "vision_tower": (top or {}).get("vision_tower_cfg"),
                 "mm_projector": (top or {}).get("mm_projector_cfg")}
    part_cfgs = {p: (_part_config(dirs[p], fallbacks[p], p) if dirs[p] else None) for p in PARTS}
    llm = hf_io.llm_config_from_hf(part_cfgs["llm"], os.path.join(dirs["llm"], "config.json"))
    vision = hf_io.vision_config_from_hf(part_cfgs["vision_tower"],
                                         os.path.join(dirs["vision_tower"], "config.json"))
    if part_cfgs["mm_projector"] is not None:
        ptype = part_cfgs["mm_projector"].get("mm_projector_type")
        if ptype is None:
            raise ConversionError(f"{dirs['mm_projector']}/config.json: missing key "
                                  "'mm_projector_type'")
        if projector_type is not None and projector_type != ptype:
            raise ConversionError(f"--projector-type {projector_type} contradicts the "
                                  f"checkpoint's mm_projector_type {ptype}")
    else:
        ptype = projector_type or "mlp_downsample"
    sel = vision_select_layer
    if sel is None:
        sel = (top or {}).get("mm_vision_select_layer", -2)
    feat = vision_select_feature or (top or {}).get("mm_vision_select_feature") or "patch"
    order = hf_io.projector_token_order_from_hf(part_cfgs["mm_projector"],
                                                "mm_projector config")
    try:
        cfg = LongVILAConfig(llm=llm, vision=vision, projector_type=ptype,
                             vision_select_layer=int(sel), vision_select_feature=feat,
                             projector_token_order=order)
    except ValueError as e:
        raise ConversionError(f"config: {e}") from e
    if top is not None:
        for key, want in (("hidden_size", llm.hidden_size), ("mm_hidden_size", vision.hidden_size)):
            if top.get(key) not in (None, want):
                raise ConversionError(f"{hf_path}/config.json: {key} {top[key]} does not match "
                                      f"the sub-model configs ({want})")
    src = HFSource(cfg=cfg, dirs=dirs, part_configs=part_cfgs, top_config=top)
    for p in PARTS:
        if dirs[p] is not None:
            src.readers[p] = SafetensorsFolder(dirs[p])
    src.vision_hf_prefix = hf_io.vision_prefix(src.readers["vision_tower"].keys())
    return src


def check_hf_tensors(src: HFSource) -> Dict[str, List[str]]:
    """Every tensor a rule needs is present with the config's shape; returns the extras.

    Extras are tensors of the HF model that LongVILAModel does not use (SigLIP's ``head.*``,
    a tied ``lm_head.weight``, old ``rotary_emb.inv_freq`` buffers): carried unchanged. Any
    other tensor (a layer the config does not have, ...) is an error naming it.
    """
    cfg = src.cfg
    used: Dict[str, set] = {p: set() for p in src.readers}
    expected = {}
    for p in src.readers:
        if p == "mm_projector":
            expected[p] = hf_io.projector_expected_shapes(cfg)
        else:
            exp = hf_io.hf_expected_shapes(p, src.part_configs[p])
            if p == "vision_tower" and src.vision_hf_prefix:
                exp = {src.vision_hf_prefix + k: v for k, v in exp.items()}
            expected[p] = exp
    for _mp, part, rules, _h, _g in model_rules(cfg, vision_hf_prefix=src.vision_hf_prefix):
        if part not in src.readers:
            continue
        r = src.readers[part]
        for rule in rules:
            for name in rule.hf:
                if name not in r:
                    raise ConversionError(f"{part}: missing tensor {name} in {r.folder}")
                want = expected[part].get(name)
                if want is not None and tuple(r.shape(name)) != tuple(want):
                    raise ConversionError(
                        f"{part}: tensor {name} has shape {tuple(r.shape(name))}, the config "
                        f"({r.folder}) implies {tuple(want)}")
                used[part].add(name)
    extras = {}
    for p, r in src.readers.items():
        extra = []
        for name in r.keys():
            if name in used[p]:
                continue
            if name.endswith(hf_io.IGNORABLE_SUFFIXES):
                extra.append(name)
            elif name in expected[p]:
                if tuple(r.shape(name)) != tuple(expected[p][name]):
                    raise ConversionError(f"{p}: tensor {name} has shape {tuple(r.shape(name))}, "
                                          f"the config implies {tuple(expected[p][name])}")
                extra.append(name)
            else:
                raise ConversionError(f"{p}: unexpected tensor {name} in {r.folder}: not a "
                                      "parameter of the model its config.json describes")
        extras[p] = extra
    return extras


_FLAG = {v: k for k, v in hf_io.DTYPES.items()}


def widest_dtype(dtypes, where: str) -> str:
    """The ``--dtype`` value that holds every value of ``dtypes`` exactly: their one dtype, or
    fp32 for a mix (bf16 and fp16 both convert to float32 exactly)."""
    floats = {d for d in set(dtypes) if d.is_floating_point}
    if not floats:
        raise ConversionError(f"{where}: no floating-point tensors to take the dtype from "
                              "(pass --dtype)")
    d = floats.pop() if len(floats) == 1 else torch.float32
    if d not in _FLAG:
        raise ConversionError(f"{where}: weights in {d}, which the converter does not write; "
                              f"pass --dtype ({', '.join(hf_io.DTYPES)})")
    return _FLAG[d]


def source_dtype(src: HFSource) -> str:
    """The ``--dtype`` default: the dtype of every tensor a mapping rule reads (fp32 if they
    mix 16-bit types)."""
    dtypes = set()
    for _mp, part, rules, _h, _g in model_rules(src.cfg, vision_hf_prefix=src.vision_hf_prefix):
        if part not in src.readers:
            continue
        r = src.readers[part]
        for rule in rules:
            for name in rule.hf:
                dtypes.add(torch_dtype(r.st_dtype(name)))
    return widest_dtype(dtypes, "HF checkpoint")
