"""The Hugging Face side of the converters: VILA's folder layout, configs, safetensors I/O.

VILA's ``save_pretrained`` (NVlabs/VILA ``llava/model/llava_arch.py``) writes::

    DIR/config.json           LlavaConfig: llm_cfg, vision_tower_cfg, mm_projector_cfg (the three
                              sub-configs as dicts), hidden_size, mm_hidden_size,
                              mm_vision_select_layer, mm_vision_select_feature, num_video_frames, ...
    DIR/llm/                  the causal LM (config.json, safetensors, generation_config.json)
                              and its tokenizer
    DIR/vision_tower/         SiglipVisionModel (config.json, safetensors) and the image
                              processor's preprocessor_config.json
    DIR/mm_projector/         the projector: config.json (model_type v2l_projector,
                              mm_projector_type) and safetensors with ``layers.N.*``

A plain ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` folder or a plain ``SiglipVisionModel``
folder is also read as one part.

Weights are read one tensor at a time (``safe_open``; sharded ``*.index.json`` folders work) and
written one tensor at a time (:class:`StreamingSafetensorsWriter` announces every tensor's shape
and dtype in the header, then appends the bytes), so neither side holds a whole model.
"""

import json
import os
import struct
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from ..models.config import LanguageModelConfig, LongVILAConfig, VisionConfig

PARTS = ("llm", "vision_tower", "mm_projector")
LLM_ARCHS = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
LLM_MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama"}
VISION_ARCHS = ("SiglipVisionModel",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
# Files of a part folder carried verbatim (besides config.json and the weights).
SIDE_FILES = {"llm": TOKENIZER_FILES + ("generation_config.json",),
              "vision_tower": ("preprocessor_config.json",),
              "mm_projector": ()}
# Non-persistent buffers that some older checkpoints saved; never parameters.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """Bad converter input: names the file, key or tensor at fault."""


# ----------------------------------------------------------------------------- dtypes
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


# ----------------------------------------------------------------------------- reading
def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"missing file {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


class SafetensorsFolder:
    """The tensors of one HF folder (``model.safetensors`` or a sharded index), read lazily."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(index):
            weight_map = _load_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index}: no weight_map")
            self.file_of = {k: os.path.join(folder, v) for k, v in weight_map.items()}
            for f in sorted(set(self.file_of.values())):
                if not os.path.isfile(f):
                    raise ConversionError(f"missing file {f} (named by {index})")
        elif os.path.isfile(single):
            self.file_of = None
            self._single = single
        else:
            if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(folder)):
                raise ConversionError(f"{folder}: only pickle weights (*.bin/*.pt) found; "
                                      "convert them to safetensors first (they are not unpickled here)")
            raise ConversionError(f"missing file {single} (no safetensors weights in {folder})")
        self._handles: Dict[str, object] = {}
        self._meta: Dict[str, Tuple[Tuple[int, ...], str, str, int, int]] = {}
        files = [self._single] if self.file_of is None else sorted(set(self.file_of.values()))
        for f in files:
            for name, (shape, dt, a, b) in _read_header(f).items():
                if self.file_of is not None and self.file_of.get(name) != f:
                    continue  # the index is authoritative
                self._meta[name] = (shape, dt, f, a, b)
        if self.file_of is not None:
            for k, f in self.file_of.items():
                if k not in self._meta:
                    raise ConversionError(f"{f}: tensor {k} named by the index is not in the file")

    def keys(self) -> List[str]:
        return list(self._meta)

    def __contains__(self, name):
        return name in self._meta

    def shape(self, name) -> Tuple[int, ...]:
        return self._meta[name][0]

    def st_dtype(self, name) -> str:
        return self._meta[name][1]

    def nbytes(self, name) -> int:
        shape, dt = self._meta[name][:2]
        n = 1
        for s in shape:
            n *= s
        return n * _ST_ITEMSIZE[dt]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read with plain file reads (not mmap: mapped pages of a big file would
        stay resident and count against the process), so memory holds just this tensor."""
        if name not in self._meta:
            raise KeyError(f"{self.folder}: missing tensor {name}")
        shape, dt, path, a, b = self._meta[name]
        if dt not in _FROM_ST_NAME:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {dt}")
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = open(path, "rb")
        buf = bytearray(b - a)
        h.seek(a)
        if h.readinto(buf) != len(buf):
            raise ConversionError(f"{path}: truncated data of tensor {name}")
        if not buf:
            return torch.empty(shape, dtype=_FROM_ST_NAME[dt])
        return torch.frombuffer(buf, dtype=_FROM_ST_NAME[dt]).reshape(shape)

    def close(self):
        for h in self._handles.values():
            h.close()
        self._handles.clear()


_FROM_ST_NAME = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                 "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _read_header(path: str) -> Dict[str, Tuple[Tuple[int, ...], str, int, int]]:
    """Name -> (shape, dtype, first byte, end byte) of a safetensors file, from its header (no
    tensor data read); a truncated or malformed file is an error naming it."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header larger than the file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out, end = {}, 0
        for k, v in header.items():
            a, b = (int(x) for x in v["data_offsets"])
            out[k] = (tuple(v["shape"]), v["dtype"], 8 + n + a, 8 + n + b)
            end = max(end, b)
    except (OSError, ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not a valid safetensors file ({e})") from e
    if 8 + n + end > size:
        raise ConversionError(f"{path}: truncated ({size} bytes, the header needs {8 + n + end})")
    return out


# ----------------------------------------------------------------------------- writing
class StreamingSafetensorsWriter:
    """Write a safetensors file one tensor at a time, in the order announced up front.

    ``entries`` = [(name, shape, torch dtype)]; the header (with every offset) is written
    first, then :meth:`write` appends each tensor's bytes. :meth:`close` checks that all came.
    """

    def __init__(self, path: str, entries: List[Tuple[str, Tuple[int, ...], torch.dtype]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = path
        self.entries = list(entries)
        header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
        for name, shape, dtype in self.entries:
            n = dtype.itemsize
            for s in shape:
                n *= s
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._next = 0
        self.bytes = 0

    def write(self, name: str, tensor: torch.Tensor):
        if self._next >= len(self.entries):
            raise ConversionError(f"{self.path}: unexpected extra tensor {name}")
        want, shape, dtype = self.entries[self._next]
        if name != want:
            raise ConversionError(f"{self.path}: tensor {name} came where {want} was expected")
        if tuple(tensor.shape) != tuple(shape):
            raise ConversionError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        t = tensor.detach().to(dtype).cpu().contiguous()
        arr = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        data = memoryview(arr.reshape(-1)).cast("B")  # the tensor's bytes, no copy
        self._f.write(data)
        self.bytes += data.nbytes
        self._next += 1

    def close(self):
        self._f.close()
        if self._next != len(self.entries):
            missing = [e[0] for e in self.entries[self._next:]]
            raise ConversionError(f"{self.path}: tensors never written: {missing[:5]}")

    def abort(self):
        if not self._f.closed:
            self._f.close()


# ----------------------------------------------------------------------------- configs
def _rope_theta(d: dict, where: str) -> float:
    """The RoPE base of an LLM config in either spelling: transformers 4 (``rope_theta``,
    ``rope_scaling``) or transformers 5 (``rope_parameters``); both present must agree."""
    rp = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    for kind in (rp.get("rope_type"), scaling.get("rope_type"), scaling.get("type")):
        if kind not in (None, "default"):
            raise ConversionError(f"{where}: rope type {kind!r} is not supported (plain RoPE only)")
    t5, t4 = rp.get("rope_theta"), d.get("rope_theta")
    if t5 is not None and t4 is not None and float(t5) != float(t4):
        raise ConversionError(f"{where}: rope_parameters.rope_theta {t5} and rope_theta {t4} "
                              "disagree (transformers 5 and 4 would run different bases)")
    theta = t5 if t5 is not None else t4
    if theta is None:
        raise ConversionError(f"{where}: no rope_theta")
    return float(theta)


# ----------------------------------------------------------------------------- exported forms
# What every transformers version VILA runs with reads the same way. VILA pins transformers
# 4.46, whose Llama/Qwen2 configs read ``rope_theta`` / ``rope_scaling`` (a config without
# them runs at base 10000) and whose SiglipVisionModel loads tensors named ``vision_model.*``
# (other names are left randomly initialised, with only a warning); transformers 5 reads
# ``rope_parameters`` and both tensor spellings.
EXPORT_VISION_PREFIX = "vision_model."
TOKEN_ORDER_KEY = "token_order"  # mm_projector/config.json: the 2x2 merge order (ours)
VILA_VERSIONS = {  # VILA version -> how it reads mm_projector_type "mlp_downsample"
    "longvila": ("column_major", "VILA up to 54c9706 (LongVILA era)"),
    "head": ("row_major", "VILA since 36f6adc (NVILA release, the current HEAD)"),
}


def rope_config_forms(base: float) -> dict:
    """Plain RoPE with base ``base`` in both spellings (transformers 4 and 5)."""
    base = float(base)
    return {"rope_theta": base, "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": base}}


def export_llm_config(d: dict, llm: LanguageModelConfig) -> dict:
    """An LLM config dict with the trained model's RoPE base (both spellings) and length."""
    d = dict(d)
    d.update(rope_config_forms(llm.rope_base))
    d["max_position_embeddings"] = llm.max_position_embeddings
    return d


def export_projector_config(d: dict, cfg: LongVILAConfig) -> dict:
    """The projector config with its type and (for the 2x2 merge) its recorded token order."""
    d = dict(d)
    d["mm_projector_type"] = cfg.projector_type
    d.pop(TOKEN_ORDER_KEY, None)
    if cfg.projector_token_order is not None:
        d[TOKEN_ORDER_KEY] = cfg.projector_token_order
    return d


def export_part_config(part: str, d: dict, cfg: LongVILAConfig) -> dict:
    if part == "llm":
        return export_llm_config(d, cfg.llm)
    if part == "mm_projector":
        return export_projector_config(d, cfg)
    return dict(d)


def export_top_config(top: dict, dtype: torch.dtype) -> dict:
    """The keys VILA's ``LlavaLlamaModel.from_pretrained`` needs besides its builder: without a
    true ``resume_path`` it builds a fresh random projector (and looks the tower up as a hub
    name); without ``model_dtype`` it loads in fp16."""
    top = dict(top)
    if not top.get("resume_path"):
        top["resume_path"] = "."
    top["model_dtype"] = f"torch.{HF_DTYPE_NAMES[dtype]}"
    top.setdefault("image_aspect_ratio", "resize")
    return top


def export_vision_name(name: str, source_prefix: str) -> str:
    """A SigLIP tensor name as VILA's transformers loads it (``vision_model.`` prefix)."""
    if source_prefix and name.startswith(source_prefix):
        name = name[len(source_prefix):]
    return EXPORT_VISION_PREFIX + name


# tokenizer_class names that only transformers 5 knows -> the class transformers 4 loads.
T5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def export_tokenizer_files(folder: str) -> List[str]:
    """Make a tokenizer folder load in transformers 4.46 as in 5: a transformers-5-only
    ``tokenizer_class`` becomes the fast class both know, and a ``chat_template.jinja`` (which
    4.46 does not read) is also written into tokenizer_config.json. Returns what changed."""
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(path):
        return []
    d, changed = _load_json(path), []
    cls = d.get("tokenizer_class")
    if cls in T5_ONLY_TOKENIZER_CLASSES:
        d["tokenizer_class"] = T5_ONLY_TOKENIZER_CLASSES[cls]
        changed.append(f"tokenizer_class {cls} -> {d['tokenizer_class']}")
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja) and not d.get("chat_template"):
        with open(jinja) as f:
            d["chat_template"] = f.read()
        changed.append("chat_template.jinja copied into tokenizer_config.json")
    if changed:
        with open(path, "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
    return changed


def projector_token_order_from_hf(d: Optional[dict], where: str) -> Optional[str]:
    """The merge order a projector config records, or None where it does not say."""
    order = (d or {}).get(TOKEN_ORDER_KEY)
    if order is not None and order not in ("column_major", "row_major"):
        raise ConversionError(f"{where}: {TOKEN_ORDER_KEY} {order!r} is not column_major or "
                              "row_major")
    return order


def token_order_warning(cfg: LongVILAConfig, target: Optional[str] = None) -> Optional[str]:
    """A warning where a VILA version (``target``; None: any) reads the exported projector
    with another token order than the one it was trained with; None where all agree."""
    if cfg.projector_type != "mlp_downsample":
        if cfg.projector_type == "mlp_downsample_2x2_fix" and target in (None, "longvila"):
            return ("note: mm_projector_type mlp_downsample_2x2_fix does not exist in "
                    f"{VILA_VERSIONS['longvila'][1]}: load it with {VILA_VERSIONS['head'][1]}")
        return None
    order = cfg.projector_token_order
    wrong = [v for k, (o, v) in VILA_VERSIONS.items()
             if o != order and (target is None or target == k)]
    if not wrong:
        return None
    right = [v for o, v in VILA_VERSIONS.values() if o == order]
    return (f"warning: this projector (mlp_downsample) merges 2x2 patches in {order} token "
            f"order; {', '.join(wrong)} reads mlp_downsample in the other order and will see "
            f"every frame's token grid transposed (no error). Run it with {', '.join(right)}, "
            "or fine-tune the projector with projector_token_order "
            f"{'row_major' if order == 'column_major' else 'column_major'} "
            "(longvila_config.json).")


def llm_family(d: dict, where: str) -> str:
    archs = d.get("architectures") or []
    for a in archs:
        if a in LLM_ARCHS:
            return LLM_ARCHS[a]
    if not archs and d.get("model_type") in LLM_MODEL_TYPES:
        return LLM_MODEL_TYPES[d["model_type"]]
    raise ConversionError(f"{where}: unknown language model architecture "
                          f"{archs or d.get('model_type')!r}; known: {', '.join(LLM_ARCHS)}")


def llm_config_from_hf(d: dict, where: str = "llm config") -> LanguageModelConfig:
    fam = llm_family(d, where)
    try:
        heads, hidden = int(d["num_attention_heads"]), int(d["hidden_size"])
        kwargs = dict(vocab_size=int(d["vocab_size"]), hidden_size=hidden,
                      num_layers=int(d["num_hidden_layers"]), num_attention_heads=heads,
                      num_query_groups=int(d.get("num_key_value_heads") or heads),
                      ffn_hidden_size=int(d["intermediate_size"]),
                      rope_base=_rope_theta(d, where), norm_eps=float(d["rms_norm_eps"]),
                      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                      max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
                      family=fam)
    except KeyError as e:
        raise ConversionError(f"{where}: missing key {e.args[0]!r}") from e
    if d.get("head_dim") not in (None, hidden // heads):
        raise ConversionError(f"{where}: head_dim {d['head_dim']} != hidden_size / "
                              f"num_attention_heads = {hidden // heads} is not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (silu)")
    if fam == "llama":
        for k in ("attention_bias", "mlp_bias"):
            if d.get(k):
                raise ConversionError(f"{where}: {k}=true is not supported for llama")
        kwargs["qkv_bias"] = False
    else:
        if d.get("use_sliding_window"):
            raise ConversionError(f"{where}: use_sliding_window=true is not supported")
        kwargs["qkv_bias"] = True
    return LanguageModelConfig(**kwargs)


def vision_config_from_hf(d: dict, where: str = "vision tower config") -> VisionConfig:
    archs = d.get("architectures") or []
    if not (set(archs) & set(VISION_ARCHS) or (not archs and d.get("model_type") ==
                                                "siglip_vision_model")):
        raise ConversionError(f"{where}: unknown vision tower architecture "
                              f"{archs or d.get('model_type')!r}; known: {', '.join(VISION_ARCHS)}")
    if d.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConversionError(f"{where}: hidden_act {d['hidden_act']!r} is not supported")
    try:
        return VisionConfig(image_size=int(d["image_size"]), patch_size=int(d["patch_size"]),
                            hidden_size=int(d["hidden_size"]),
                            num_layers=int(d["num_hidden_layers"]),
                            num_attention_heads=int(d["num_attention_heads"]),
                            intermediate_size=int(d["intermediate_size"]),
                            norm_eps=float(d.get("layer_norm_eps", 1e-6)),
                            num_channels=int(d.get("num_channels", 3)))
    except KeyError as e:
        raise ConversionError(f"{where}: missing key {e.args[0]!r}") from e


def hf_llm_config(cfg: LanguageModelConfig, dtype: torch.dtype):
    """A transformers config object for the language model."""
    from transformers import LlamaConfig, Qwen2Config
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                  intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_query_groups, rms_norm_eps=cfg.norm_eps,
                  rope_theta=cfg.rope_base, max_position_embeddings=cfg.max_position_embeddings,
                  tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu")
    if cfg.family == "qwen2":
        c = Qwen2Config(**common)
        c.architectures = ["Qwen2ForCausalLM"]
    elif cfg.family == "llama":
        c = LlamaConfig(attention_bias=False, mlp_bias=False, **common)
        c.architectures = ["LlamaForCausalLM"]
    else:
        raise ConversionError(f"unknown language model family {cfg.family!r}")
    c.dtype = HF_DTYPE_NAMES[dtype]
    return c


def hf_vision_config(cfg: VisionConfig, dtype: torch.dtype, use_head: bool = False):
    from transformers import SiglipVisionConfig
    c = SiglipVisionConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                           num_hidden_layers=cfg.num_layers,
                           num_attention_heads=cfg.num_attention_heads,
                           image_size=cfg.image_size, patch_size=cfg.patch_size,
                           layer_norm_eps=cfg.norm_eps, num_channels=cfg.num_channels,
                           hidden_act="gelu_pytorch_tanh", vision_use_head=use_head)
    c.architectures = ["SiglipVisionModel"]
    c.dtype = HF_DTYPE_NAMES[dtype]
    return c


def hf_projector_config(projector_type: str, dtype: torch.dtype,
                        token_order: Optional[str] = None) -> dict:
    d = {"architectures": ["MultimodalProjector"], "mm_projector_type": projector_type,
         "model_type": "v2l_projector", "dtype": HF_DTYPE_NAMES[dtype]}
    if token_order is not None:
        d[TOKEN_ORDER_KEY] = token_order
    return d


def vila_top_config(cfg: LongVILAConfig, llm: dict, vision: dict, projector: dict,
                    dtype: torch.dtype, num_video_frames: int) -> dict:
    """VILA's top-level config.json (the keys of a released LongVILA / NVILA config)."""
    return {
        "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
        "llm_cfg": dict(llm, _name_or_path="./llm"),
        "vision_tower_cfg": dict(vision, _name_or_path="./vision_tower"),
        "mm_projector_cfg": dict(projector, _name_or_path="./mm_projector"),
        "hidden_size": cfg.llm.hidden_size, "mm_hidden_size": cfg.vision.hidden_size,
        "mm_vision_select_layer": cfg.vision_select_layer,
        "mm_vision_select_feature": cfg.vision_select_feature,
        "num_video_frames": num_video_frames, "image_aspect_ratio": "resize",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "mm_projector_lr": None, "vision_resolution": -1, "interpolate_mode": "linear",
        "s2": False, "drop_path_rate": 0.0, "resume_path": "./vlm",
        "tune_language_model": True, "tune_mm_projector": True, "tune_vision_tower": True,
        "model_dtype": f"torch.{HF_DTYPE_NAMES[dtype]}",
        "fps": 0.0, "num_time_tokens": 0, "time_token_format": "<t{t}>",
    }


# ----------------------------------------------------------------------------- expected shapes
def hf_expected_shapes(part: str, d: dict) -> Dict[str, Tuple[int, ...]]:
    """Every parameter of the transformers module described by config dict ``d`` (meta device)."""
    import transformers
    if part == "mm_projector":
        raise ValueError("the projector has no transformers module")
    cls_name = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}.get(
        llm_family(d, "llm config")) if part == "llm" else "SiglipVisionModel"
    conf_cls = {"Qwen2ForCausalLM": transformers.Qwen2Config,
                "LlamaForCausalLM": transformers.LlamaConfig,
                "SiglipVisionModel": transformers.SiglipVisionConfig}[cls_name]
    try:
        conf = conf_cls.from_dict({k: v for k, v in d.items() if not k.startswith("_")})
        with torch.device("meta"):
            module = getattr(transformers, cls_name)(conf)
    except Exception as e:  # noqa: BLE001 - transformers' own validation of the config
        raise ConversionError(f"{part} config: transformers rejects it as {cls_name} "
                              f"({type(e).__name__}: {e})") from e
    # Tied weights appear under both names in state_dict(); the saved file holds one.
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def projector_expected_shapes(cfg: LongVILAConfig) -> Dict[str, Tuple[int, ...]]:
    from ..models.projector import MultimodalProjector
    with torch.device("meta"):
        m = MultimodalProjector(cfg.projector_type, cfg.vision.hidden_size, cfg.llm.hidden_size,
                                cfg.projector_token_order)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def vision_prefix(keys: Iterable[str]) -> str:
    return "vision_model." if any(k.startswith("vision_model.") for k in keys) else ""
