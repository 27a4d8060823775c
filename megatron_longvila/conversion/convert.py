"""Hugging Face (VILA layout) <-> Megatron-Core dist checkpoint, one tensor at a time.

The Megatron side is what ``training/checkpointing.py`` defines and ``pretrain_longvila.py
--load`` reads: ``SAVE/latest_checkpointed_iteration.txt`` ("release"), ``SAVE/release/`` (a
Megatron-Core dist checkpoint of ``{"model": model.sharded_state_dict()}``) and
``SAVE/longvila_config.json``. Next to them the converter keeps ``SAVE/hf_assets/``: what a
Megatron checkpoint has no place for but a round trip needs (the HF configs as written,
tokenizer and image-processor files, HF tensors LongVILAModel does not use such as SigLIP's
``head.*``, and the HF name prefix of the vision tower).

Memory (see tools/benchmarks/bench_convert.py for measurements):

- HF -> Megatron (default, :mod:`.dist_writer`): one process; for each parameter the HF
  tensor(s) are read (plain file reads, no mmap), mapped and handed to PyTorch DCP's writer
  just before they are written. Peak memory is a few copies of the largest tensor plus a
  fixed overhead, independent of the number of layers. The checkpoint holds full tensors and
  loads at any tensor-parallel size.
- HF -> Megatron with ``build_model=True``: the TP-sharded LongVILAModel is built in
  ``tensor_parallel_size`` gloo processes, filled one HF tensor at a time, and saved with
  Megatron-Core's ``dist_checkpointing.save`` (via ``save_model_checkpoint``). Peak memory is
  the model once (spread over the processes) plus Megatron's save overhead.
- Megatron -> HF: one Megatron tensor (one layer of a stacked key) at a time is read from the
  dist checkpoint at full size, whatever layout saved it, mapped, and appended to a
  streaming safetensors writer. Peak memory is a few copies of the largest tensor.
"""

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..models.config import LongVILAConfig
from . import hf_io
from .hf_io import PARTS, ConversionError, SafetensorsFolder, StreamingSafetensorsWriter
from .mapping import model_rules, to_hf, to_mcore

ASSETS = "hf_assets"
ASSETS_META = "conversion.json"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM (its own address space's high-water mark).

    Not getrusage's ru_maxrss: on Linux that also keeps the peak of the address space before
    exec, i.e. of the parent that forked this process.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


# ============================================================================ HF source
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
    try:
        cfg = LongVILAConfig(llm=llm, vision=vision, projector_type=ptype,
                             vision_select_layer=int(sel), vision_select_feature=feat)
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


# ============================================================================ workers
def _init_dist_single():
    import socket
    import torch.distributed as dist
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)


def _spawn_entry(rank, world, port, fn, args, queue):
    import traceback
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        queue.put((rank, "ok", out))
    except ConversionError as e:
        queue.put((rank, "conversion", str(e)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state
            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, in_process: bool = False):
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; returns the results of all ranks.

    ``in_process`` (world 1 only) runs it here, reusing an initialised one-rank world.
    """
    if in_process:
        assert world == 1
        _init_dist_single()
        return [fn(0, 1, *args)]
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_spawn_entry, args=(r, world, port, fn, args, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results, error = {}, None
    try:
        while len(results) < world and error is None:
            try:
                rank, status, out = queue.get(timeout=5)
            except Exception:  # queue.Empty: check for dead workers
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    error = ("error", f"a conversion worker died (exit code {dead[0].exitcode})")
                continue
            if status == "ok":
                results[rank] = out
            else:
                error = (status, f"rank {rank}: {out}")
    finally:
        for p in procs:
            p.join(timeout=10 if error else None)
            if p.is_alive():
                p.terminate()
                p.join()
    if error is not None:
        if error[0] == "conversion":
            raise ConversionError(error[1].split(": ", 1)[1])
        raise RuntimeError("conversion worker failed\n" + error[1])
    return [results[r] for r in range(world)]


def _ensure_model_parallel(tp: int):
    from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        have = parallel_state.get_tensor_model_parallel_world_size()
        if have != tp:
            raise RuntimeError(f"model parallel state already initialised with TP={have}")
        return False
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    return True


def _hf_to_mcore_worker(rank, world, spec, cfg_dict, dtype_name, out_dir, seed, show_progress):
    """One TP rank: build the model, fill it one HF tensor at a time, save collectively."""
    from megatron_longvila import cpu_compat
    from megatron_longvila.models import LongVILAModel
    from megatron_longvila.training.checkpointing import save_model_checkpoint
    from .tp import shard_full_tensor

    dtype = hf_io.parse_dtype(dtype_name)
    cfg = LongVILAConfig.from_dict(cfg_dict)
    created = _ensure_model_parallel(world)
    try:
        cpu_compat.model_parallel_seed(seed)
        model = LongVILAModel(cfg, dtype=dtype)
        params = dict(model.named_parameters())
        readers = {p: SafetensorsFolder(d) for p, d in spec["dirs"].items()}
        todo = [(mp, part, rule, h, g) for mp, part, rules, h, g in
                model_rules(cfg, vision_hf_prefix=spec["vision_hf_prefix"])
                for rule in rules if part in readers]
        bar = _bar(len(todo), "HF -> Megatron", show_progress and rank == 0)
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
            from megatron.core import parallel_state
            parallel_state.destroy_model_parallel()


def _bar(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


# ============================================================================ atomic output
def _prepare_output(save: str, overwrite: bool) -> str:
    save = os.path.abspath(save)
    if os.path.exists(save):
        if not os.path.isdir(save):
            raise ConversionError(f"output {save} exists and is not a directory")
        if os.listdir(save) and not overwrite:
            raise ConversionError(f"output directory {save} is not empty (pass --overwrite to "
                                  "replace it)")
    parent = os.path.dirname(save)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(save)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _commit_output(tmp: str, save: str):
    save = os.path.abspath(save)
    if os.path.exists(save):
        old = save + f".old-{os.getpid()}"
        os.replace(save, old)
        os.replace(tmp, save)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, save)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(path) for f in fs)


def _copy_side_files(src_dir: Optional[str], dst_dir: str, names) -> List[str]:
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


def _write_extras(reader: SafetensorsFolder, names: List[str], path: str) -> int:
    entries = [(n, reader.shape(n), _torch_dtype(reader.st_dtype(n))) for n in names]
    w = StreamingSafetensorsWriter(path, entries)
    try:
        for n in names:
            w.write(n, reader.get(n))
    except BaseException:
        w.abort()
        raise
    w.close()
    return w.bytes


_FROM_ST = {v: k for k, v in hf_io._ST_DTYPES.items()}


def _torch_dtype(st: str) -> torch.dtype:
    if st not in _FROM_ST:
        raise ConversionError(f"unsupported safetensors dtype {st}")
    return _FROM_ST[st]


# ============================================================================ HF -> Megatron
def convert_hf_to_megatron(save: str, hf_path: Optional[str] = None, llm_path: Optional[str] = None,
                           vision_path: Optional[str] = None, tensor_parallel_size: int = 1,
                           dtype: str = "bf16", projector_type: Optional[str] = None,
                           vision_select_layer: Optional[int] = None, seed: int = 1234,
                           overwrite: bool = False, in_process: bool = False,
                           progress: bool = True, build_model: bool = False) -> dict:
    """Convert; returns a summary dict. On any error nothing is left at ``save``.

    Default: the streaming writer (:mod:`.dist_writer`), one process, one tensor in memory at
    a time; the checkpoint holds full tensors and loads at any TP size (the TP size is only
    checked against the shapes). ``build_model``: instead build the TP-sharded LongVILAModel
    in ``tensor_parallel_size`` processes and save it with Megatron-Core's own
    ``dist_checkpointing.save`` (memory: the model once, spread over the processes).
    """
    t0 = time.time()
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
    tmp = _prepare_output(save, overwrite)
    try:
        if build_model:
            results = run_ranks(_hf_to_mcore_worker, tp, src.spec(), cfg.to_dict(), dtype, tmp,
                                seed, progress, in_process=in_process and tp == 1)
        else:
            results = [_stream_to_megatron(src, dtype, tmp, seed, progress, tp)]
        # What the Megatron checkpoint has no place for, for the way back.
        assets = os.path.join(tmp, ASSETS)
        os.makedirs(assets)
        extra_bytes, carried = 0, {}
        for p, names in extras.items():
            if names:
                os.makedirs(os.path.join(assets, p), exist_ok=True)
                extra_bytes += _write_extras(src.readers[p], names,
                                             os.path.join(assets, p, "extra.safetensors"))
                log(f"note: {p}: {len(names)} HF tensor(s) unused by LongVILAModel carried in "
                    f"{ASSETS}/{p}/extra.safetensors: {', '.join(names[:4])}"
                    f"{' ...' if len(names) > 4 else ''}")
        for p in PARTS:
            if src.part_configs[p] is not None:
                os.makedirs(os.path.join(assets, p), exist_ok=True)
                with open(os.path.join(assets, p, "config.json"), "w") as f:
                    json.dump(src.part_configs[p], f, indent=2)
            carried[p] = _copy_side_files(src.dirs[p], os.path.join(assets, p),
                                          hf_io.SIDE_FILES[p])
        if src.top_config is not None:
            with open(os.path.join(assets, "config.json"), "w") as f:
                json.dump(src.top_config, f, indent=2)
        if not any(n in hf_io.TOKENIZER_FILES for n in carried["llm"]):
            log(f"warning: no tokenizer files in {src.dirs['llm']}; the Megatron checkpoint "
                "carries no tokenizer")
        meta = {"vision_hf_prefix": src.vision_hf_prefix, "source": os.path.abspath(
                    hf_path or src.dirs["llm"]),
                "projector_converted": "mm_projector" in src.readers,
                "source_dtypes": {p: sorted({r.st_dtype(n) for n in r.keys()})
                                  for p, r in src.readers.items()},
                "extras": extras, "dtype": dtype, "tensor_model_parallel_size": tp}
        with open(os.path.join(assets, ASSETS_META), "w") as f:
            json.dump(meta, f, indent=2)
        _commit_output(tmp, save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for r in src.readers.values():
            r.close()
    n_tensors = sum(len(rules) for _m, part, rules, _h, _g in
                    model_rules(cfg, vision_hf_prefix=src.vision_hf_prefix) if part in src.readers)
    summary = {"direction": "hf_to_megatron", "tensors": n_tensors,
               "writer": "megatron-core save (model built)" if build_model else "streaming",
               "hf_tensors_read": sum(len(r.keys()) for r in src.readers.values()),
               "extra_tensors": sum(len(v) for v in extras.values()),
               "read_bytes": results[0]["read_bytes"] + extra_bytes,
               "written_bytes": _dir_bytes(save), "tensor_model_parallel_size": tp,
               "dtype": dtype, "seconds": time.time() - t0,
               "projector_initialized": not ("mm_projector" in src.readers),
               "peak_rss_bytes": max([peak_rss_bytes()] + [r["peak_rss"] for r in results]),
               "save": os.path.abspath(save)}
    return summary


def fresh_projector_state(cfg: LongVILAConfig, seed: int) -> Dict[str, torch.Tensor]:
    """The projector a source without one starts from: VILA's module, default init, seeded."""
    from ..models.projector import MultimodalProjector
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    proj = MultimodalProjector(cfg.projector_type, cfg.vision.hidden_size, cfg.llm.hidden_size)
    torch.set_rng_state(state)
    return {k: v.detach() for k, v in proj.state_dict().items()}


def _stream_to_megatron(src: HFSource, dtype: str, out_dir: str, seed: int, progress: bool,
                        tp: int) -> dict:
    from .dist_writer import save_release_streaming
    _init_dist_single()
    created = _ensure_model_parallel(1)
    try:
        shapes = {p: r.shape for p, r in src.readers.items()}
        fresh = None if "mm_projector" in src.readers else fresh_projector_state(src.cfg, seed)
        counts = save_release_streaming(src.cfg, src.getters(), shapes, hf_io.parse_dtype(dtype),
                                        out_dir, vision_hf_prefix=src.vision_hf_prefix,
                                        fresh_projector=fresh, progress=progress,
                                        tensor_parallel_size=tp)
    finally:
        if created:
            from megatron.core import parallel_state
            parallel_state.destroy_model_parallel()
    counts["peak_rss"] = peak_rss_bytes()
    return counts


# ============================================================================ Megatron -> HF
def _twin_config(cfg: LongVILAConfig) -> LongVILAConfig:
    """The same structure (layers, heads, groups, biases, tying, projector) with tiny sizes."""
    import dataclasses
    l, v = cfg.llm, cfg.vision
    llm = dataclasses.replace(l, vocab_size=8, hidden_size=2 * l.num_attention_heads,
                              ffn_hidden_size=2)
    vis = dataclasses.replace(v, hidden_size=2 * v.num_attention_heads, intermediate_size=2,
                              image_size=2, patch_size=1)
    return dataclasses.replace(cfg, llm=llm, vision=vis)


def sharded_key_index(cfg: LongVILAConfig, return_state_dict: bool = False):
    """Megatron parameter name -> (dist-checkpoint key, prepended axes, layer index).

    Read off the sharded state dict of a tiny model of the same structure (so keys such as
    ``decoder.layers.self_attention.linear_qkv.layer_norm_weight`` and the stacked layer axis
    come from Megatron-Core itself, not from a copy of its rules). Needs a 1-rank TP state.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron_longvila import cpu_compat
    from megatron_longvila.models import LongVILAModel
    from megatron_longvila.training.checkpointing import _sharded_metadata

    state = torch.get_rng_state()
    cpu_compat.model_parallel_seed(0)
    twin = LongVILAModel(_twin_config(cfg))
    torch.set_rng_state(state)
    params = dict(twin.named_parameters())
    by_ptr = {}
    for n, p in params.items():
        by_ptr.setdefault(p.data_ptr(), []).append(n)
    sd = twin.sharded_state_dict(metadata=_sharded_metadata())
    index = {}
    for v in nested_values(sd):
        if not isinstance(v, (ShardedTensor, ShardedTensorFactory)) or v.data is None:
            continue
        names = by_ptr.get(v.data.data_ptr(), [])
        if len(names) != 1:
            continue
        name = names[0]
        if isinstance(v, ShardedTensorFactory):
            entry = (v.key, None, None)
        else:
            pre = v.prepend_axis_num
            entry = (v.key, pre, v.global_offset[0] if pre else None)
        if name in index and index[name] != entry:
            # The same tensor under two keys (e.g. a tied output layer): keep the one
            # named after the parameter itself.
            if not entry[0].endswith(name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]):
                continue
        index[name] = entry
    # Factories (the fused SwiGLU fc1): stacked like their siblings in the same block.
    for name, (key, pre, layer) in list(index.items()):
        if pre is None:
            sib = [(k, pr, ly) for n, (k, pr, ly) in index.items()
                   if pr is not None and n.rsplit(".mlp.", 1)[0] == name.rsplit(".mlp.", 1)[0]]
            if not sib:
                raise RuntimeError(f"cannot place the sharded factory of {name}")
            index[name] = (key, sib[0][1], sib[0][2])
    missing = [n for n in params if n not in index]
    if missing:
        raise RuntimeError(f"no dist-checkpoint key for {missing[:5]}")
    return (index, sd) if return_state_dict else index


class MegatronReader:
    """Full tensors of a LongVILA Megatron checkpoint, one at a time (any saved TP layout).

    Reads the region of one parameter (e.g. layer 7 of a stacked ``decoder.layers.*`` key)
    straight from the torch_dist (PyTorch DCP) files, whatever chunks the saving ranks wrote.
    """

    def __init__(self, load: str, iteration=None):
        import torch.distributed.checkpoint as dcp
        from megatron_longvila.training import checkpointing as ck
        if not os.path.isdir(load):
            raise ConversionError(f"Megatron checkpoint directory {load!r} does not exist")
        try:
            self.path = ck.checkpoint_dir(load, iteration)
        except (FileNotFoundError, ValueError) as e:
            raise ConversionError(str(e)) from e
        self.cfg = ck.read_checkpoint_config(load)
        if self.cfg is None:
            raise ConversionError(f"missing file {os.path.join(load, ck.CONFIG_FILE)}")
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
        import torch.distributed.checkpoint as dcp
        key, pre, layer = self._key(name)
        m = self.meta[key]
        shape = tuple(m.size[pre:])
        region = torch.empty((1,) * pre + shape, dtype=m.properties.dtype)
        offsets = ([layer] if pre else []) + [0] * len(shape)
        dcp.load({key: region}, storage_reader=self.reader,
                 planner=_RegionLoadPlanner({key: (offsets, region)}))
        return region.reshape(shape)


def _region_planner_cls():
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionLoadPlanner(DefaultLoadPlanner):
        """Loads a sub-region (offsets, shape) of a checkpointed global tensor into a tensor."""

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

    return RegionLoadPlanner


def _RegionLoadPlanner(regions):
    return _region_planner_cls()(regions)


def _hf_names_and_shapes(rule, full_shape, heads, groups):
    """The HF tensors a Megatron tensor of ``full_shape`` becomes, without computing them."""
    meta = torch.empty(full_shape, device="meta")
    return [(n, tuple(t.shape)) for n, t in zip(rule.hf, to_hf(rule, meta, heads, groups))]


def _read_assets(load: str):
    adir = os.path.join(load, ASSETS)
    meta = {}
    if os.path.isfile(os.path.join(adir, ASSETS_META)):
        meta = hf_io._load_json(os.path.join(adir, ASSETS_META))
    return adir, meta


def _carried_config(adir: str, part: str, cfg: LongVILAConfig) -> Optional[dict]:
    """The HF config carried from the source, if it still describes this architecture."""
    p = os.path.join(adir, part, "config.json")
    if not os.path.isfile(p):
        return None
    d = hf_io._load_json(p)
    try:
        if part == "llm" and hf_io.llm_config_from_hf(d) != cfg.llm:
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


def convert_megatron_to_hf(load: str, save: str, dtype: str = "bf16", iteration=None,
                           num_video_frames: Optional[int] = None, tokenizer: Optional[str] = None,
                           overwrite: bool = False, progress: bool = True) -> dict:
    """Write VILA's HF layout from a Megatron checkpoint. Needs an initialised 1-rank world
    (the CLI makes one); reads every tensor at full size regardless of the saved layout."""
    t0 = time.time()
    tdtype = hf_io.parse_dtype(dtype)
    _init_dist_single()
    created = _ensure_model_parallel(1)
    try:
        reader = MegatronReader(load, iteration)
    except BaseException:
        if created:
            from megatron.core import parallel_state
            parallel_state.destroy_model_parallel()
        raise
    cfg = reader.cfg
    adir, meta = _read_assets(load)
    prefix = meta.get("vision_hf_prefix", "vision_model.")
    parts_rules = model_rules(cfg, vision_hf_prefix=prefix)
    # Plan every file's header first (names, shapes): all from metadata, no tensor data.
    plan: Dict[str, list] = {p: [] for p in PARTS}
    for mp, part, rules, h, g in parts_rules:
        for rule in rules:
            shape, _ = reader.full_shape(mp + rule.mcore)
            plan[part] += [(n, s, tdtype) for n, s in _hf_names_and_shapes(rule, shape, h, g)]
    extras = {}
    for p in PARTS:
        ep = os.path.join(adir, p, "extra.safetensors")
        if os.path.isfile(ep):
            r = _ExtraReader(ep)
            extras[p] = r
            plan[p] += [(n, r.shape(n), _torch_dtype(r.st_dtype(n))) for n in r.keys()]
    tmp = _prepare_output(save, overwrite)
    writers = {}
    total = sum(len(rules) for _m, _p, rules, _h, _g in parts_rules)
    try:
        for p in PARTS:
            os.makedirs(os.path.join(tmp, p))
            writers[p] = StreamingSafetensorsWriter(os.path.join(tmp, p, "model.safetensors"),
                                                    plan[p])
        bar = _bar(total, "Megatron -> HF", progress)
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
                writers[p].write(n, r.get(n))
        for w in writers.values():
            w.close()
        written = sum(w.bytes for w in writers.values())
        # Configs: the carried ones where they still describe the model, else fresh ones.
        head = any(n.startswith(prefix + "head.") for n in
                   (extras["vision_tower"].keys() if "vision_tower" in extras else []))
        fresh = {"llm": lambda: hf_io.hf_llm_config(cfg.llm, tdtype).to_dict(),
                 "vision_tower": lambda: hf_io.hf_vision_config(cfg.vision, tdtype,
                                                                use_head=head).to_dict(),
                 "mm_projector": lambda: hf_io.hf_projector_config(cfg.projector_type, tdtype)}
        part_d, changed = {}, {}
        for p in PARTS:
            carried = _carried_config(adir, p, cfg)
            d = (_set_dtype(carried, tdtype, add=False) if carried is not None
                 else _set_dtype(fresh[p](), tdtype))
            part_d[p], changed[p] = d, carried is None or d != carried
            with open(os.path.join(tmp, p, "config.json"), "w") as f:
                json.dump(d, f, indent=2, sort_keys=True)
        top_p = os.path.join(adir, "config.json")
        if os.path.isfile(top_p):
            top = hf_io._load_json(top_p)
            for p, key in (("llm", "llm_cfg"), ("vision_tower", "vision_tower_cfg"),
                           ("mm_projector", "mm_projector_cfg")):
                if changed[p] or top.get(key) is None:
                    top[key] = dict(part_d[p], _name_or_path=f"./{p}")
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
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(top, f, indent=2, sort_keys=True)
        # Side files: tokenizer (+ generation config), image processor.
        tok_src = tokenizer or os.path.join(adir, "llm")
        got = _copy_side_files(tok_src, os.path.join(tmp, "llm"), hf_io.SIDE_FILES["llm"])
        if not any(n in hf_io.TOKENIZER_FILES for n in got):
            log("warning: no tokenizer files carried in the Megatron checkpoint (or --tokenizer); "
                "llm/ has no tokenizer")
        got = _copy_side_files(os.path.join(adir, "vision_tower"), os.path.join(tmp, "vision_tower"),
                               hf_io.SIDE_FILES["vision_tower"])
        if not got:
            _write_image_processor(cfg, os.path.join(tmp, "vision_tower"))
        _commit_output(tmp, save)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if created:
            from megatron.core import parallel_state
            parallel_state.destroy_model_parallel()
    return {"direction": "megatron_to_hf", "tensors": total,
            "hf_tensors_written": sum(len(v) for v in plan.values()),
            "read_bytes": read_bytes, "written_bytes": written, "dtype": dtype,
            "seconds": time.time() - t0, "peak_rss_bytes": peak_rss_bytes(),
            "save": os.path.abspath(save)}


class _ExtraReader(SafetensorsFolder):
    def __init__(self, path):
        self.folder = os.path.dirname(path)
        self.file_of = None
        self._single = path
        self._handles = {}
        self._meta = {k: v[:2] + (path,) + v[2:] for k, v in hf_io._read_header(path).items()}


def _write_image_processor(cfg: LongVILAConfig, folder: str):
    from transformers import SiglipImageProcessor
    s = cfg.vision.image_size
    SiglipImageProcessor(size={"height": s, "width": s}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(folder)


def format_summary(s: dict) -> str:
    lines = [f"converted {s['tensors']} Megatron tensors ({s['direction'].replace('_', ' ')})",
             f"  read    {_human(s['read_bytes'])}", f"  written {_human(s['written_bytes'])}",
             f"  dtype   {s['dtype']}", f"  time    {s['seconds']:.1f} s",
             f"  peak RSS {_human(s['peak_rss_bytes'])} (largest process)",
             f"  output  {s['save']}"]
    if s.get("extra_tensors"):
        lines.insert(1, f"  + {s['extra_tensors']} unused HF tensors carried in {ASSETS}/")
    if s.get("projector_initialized"):
        lines.insert(1, "  projector: not in the source; freshly initialised (seeded)")
    return "\n".join(lines)
