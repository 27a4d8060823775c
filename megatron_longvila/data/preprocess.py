"""Annotations + videos -> WebDataset shards (the library behind ``tools/preprocess_videos.py``).

One sample per annotation entry. In the tar, sample ``<key>`` holds
  ``<key>.json``        {"conversations": [...], "media": "video"|"image"|"text", "source": path,
                         "num_frames": F, "frame_times": [...], "frame_indices": [...],
                         "start": s|null, "end": e|null, "id": ..., "image_size": H,
                         "frame_timing": "timestamps"|"frame index"|null}
  ``<key>.0000.jpg`` .. ``<key>.{F-1:04d}.jpg``  the frames, already resized (or ``.png``)
The frames are stored as a player shows them (upright, square pixels; see ``data/video.py``);
``frame_times`` are their presentation times in seconds from the first frame shown (frames
that an edit list hides do not count), ``frame_indices`` their indices among the frames shown;
for a stream without timestamps both come from the decoding order ("frame index" timing).
The key is ``<prefix><annotation index:08d>`` so a sample can be traced to its line.

The output is committed whole or not at all: shards and metadata are built in a staging directory
inside the output directory and moved in only when the run has finished (the old ``.nv-meta``
goes first and the new one comes last, so a run that dies at any point leaves either the
previous dataset or none, never new shards described by old metadata). The dataset metadata of
megatron-energon (``.nv-meta/dataset.yaml`` as a CrudeWebdataset, ``split.yaml``, ``.info.yaml``
and ``.info.json`` with the per-shard sample counts) is written last, together with
``.nv-meta/longvila.json`` (preprocessing settings and the summary) that our loader reads.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN
from .video import MediaError, decode_video, is_image_path, load_image, resize_frame

log = logging.getLogger(__name__)

META_DIR = ".nv-meta"
LONGVILA_META = "longvila.json"
ROLES_USER = ("human", "user")
ROLES_ASSISTANT = ("gpt", "assistant")
ROLES_SYSTEM = ("system",)


class AnnotationError(ValueError):
    """A malformed annotation entry; the message says which line and what is wrong."""


class PreprocessError(RuntimeError):
    """Raised under ``strict`` for the first bad entry, naming it and the reason."""


@dataclass
class PreprocessConfig:
    num_frames: int = 8
    fps: Optional[float] = None  # sample at this rate instead of num_frames...
    max_frames: Optional[int] = None  # ...capped at this many frames
    image_size: int = 384
    resize_mode: str = "resize"  # VILA's for SigLIP (image_aspect_ratio: resize)
    image_format: str = "jpg"  # jpg or png (png is lossless)
    jpeg_quality: int = 95
    shard_max_bytes: int = 1 << 30
    shard_max_samples: int = 10000
    num_workers: int = 1
    strict: bool = False
    key_prefix: str = "s"
    progress: bool = True
    overwrite: bool = False
    allow_outside_media_root: bool = False  # read media outside media_root (with a warning)


@dataclass
class PreprocessSummary:
    written: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)  # (entry name, reason)
    frames: int = 0
    bytes: int = 0
    shards: List[str] = field(default_factory=list)
    seconds: float = 0.0

    def format(self) -> str:
        lines = [f"videos written: {self.written}", f"skipped: {len(self.skipped)}",
                 f"frames: {self.frames}", f"bytes: {self.bytes}",
                 f"shards: {len(self.shards)}", f"seconds: {self.seconds:.2f}"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- annotations

def _utf8_error(path: str, data: bytes, e: UnicodeDecodeError, base_line: int = 1) -> str:
    line = base_line + data[:e.start].count(b"\n")
    col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return (f"{path} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col}); "
            f"save the file as UTF-8")


def read_annotations(path: str) -> List[Tuple[int, Any]]:
    """(index, entry) for each entry of a JSON list or JSONL file; an entry that does not
    parse (invalid JSON or invalid UTF-8 on its line) is returned as an ``AnnotationError`` in
    place of the dict, so one bad line is skipped like any other bad entry."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # UTF-8 byte order mark
    if data.lstrip().startswith(b"["):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise AnnotationError(_utf8_error(path, data, e)) from None
        try:
            data_ = json.loads(text)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{path} is not valid JSON: {e}") from e
        return list(enumerate(data_))
    try:  # one JSON document that is not a list (JSONL files fail here and are read below)
        doc = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    else:
        if not (isinstance(doc, dict) and "conversations" in doc):
            raise AnnotationError(f"{path}: expected a JSON list of entries or JSONL, "
                                  f"got one {type(doc).__name__}")
    out = []
    idx = 0
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append((idx, AnnotationError(_utf8_error(path, raw, e, lineno))))
            idx += 1
            continue
        try:
            out.append((idx, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((idx, AnnotationError(f"{path} line {lineno}: not valid JSON: {e}")))
        idx += 1
    return out


def _num(v, what):
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise AnnotationError(f"{what} is not a number: {v!r}") from None


def validate_entry(entry: Any, media_root: str, allow_outside: bool = False) -> Dict[str, Any]:
    """Check one annotation entry and normalise it: {media_path|None, source|None, media,
    conversations, start, end, id}; ``source`` is the media path relative to ``media_root``
    (what the shard records: never an absolute path). A media path that leaves ``media_root``
    (``../``, absolute, a symlink out) is refused unless ``allow_outside`` (then warned about).
    Raises AnnotationError naming the problem."""
    if isinstance(entry, AnnotationError):
        raise entry
    if not isinstance(entry, dict):
        raise AnnotationError(f"entry is a {type(entry).__name__}, not an object")
    convs = entry.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise AnnotationError("missing or empty 'conversations' list")
    norm = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) \
                or not isinstance(turn.get("value"), str):
            raise AnnotationError(f"conversation turn {i} needs string 'from' and 'value'")
        role = turn["from"].lower()
        if role not in ROLES_USER + ROLES_ASSISTANT + ROLES_SYSTEM:
            raise AnnotationError(f"conversation turn {i} has unknown role {turn['from']!r}")
        norm.append({"from": role, "value": turn["value"]})
    if not any(t["from"] in ROLES_ASSISTANT for t in norm):
        raise AnnotationError("no assistant ('gpt') turn to learn from")
    media_rel = None
    for k in ("video", "image", "path", "video_path", "image_path"):
        if entry.get(k) is not None:
            media_rel = entry[k]
            break
    if media_rel is not None and not isinstance(media_rel, str):
        raise AnnotationError(f"media path is not a string: {media_rel!r}")
    n_markers = sum(t["value"].count(DEFAULT_VIDEO_TOKEN) + t["value"].count(DEFAULT_IMAGE_TOKEN)
                    for t in norm)
    if media_rel is None:
        if n_markers:
            raise AnnotationError("has an <image>/<video> marker but no video or image path")
        media, path = "text", None
    else:
        if n_markers > 1:
            raise AnnotationError(f"{n_markers} <image>/<video> markers; one video per entry")
        path = media_rel if os.path.isabs(media_rel) else os.path.join(media_root, media_rel)
        root = os.path.realpath(media_root)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            if not allow_outside:
                raise AnnotationError(
                    f"media path {media_rel!r} is outside the media root {media_root} (it "
                    f"resolves to {real}); move it under the root or pass "
                    f"--allow-media-outside-root")
            log.warning("media path %r is outside the media root %s (resolves to %s)",
                        media_rel, media_root, real)
        media = "image" if is_image_path(path) else "video"
    start = _num(entry.get("start", entry.get("start_time")), "start")
    end = _num(entry.get("end", entry.get("end_time")), "end")
    if start is not None and end is not None and end < start:
        raise AnnotationError(f"end {end} before start {start}")
    source = None if path is None else os.path.relpath(os.path.abspath(path),
                                                       os.path.abspath(media_root))
    return {"media_path": path, "source": source, "media": media, "conversations": norm,
            "start": start, "end": end, "id": entry.get("id")}


# ----------------------------------------------------------------------------- one sample

def encode_frame(frame: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(frame).save(buf, format="PNG")
    else:
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def process_entry(args) -> Tuple[str, str, Any]:
    """Worker: -> ("ok", key, (sample dict of bytes, n_frames)) or ("skip", name, reason)."""
    idx, entry, media_root, cfg = args
    key = f"{cfg.key_prefix}{idx:08d}"
    name = f"entry {idx}"
    try:
        e = validate_entry(entry, media_root, cfg.allow_outside_media_root)
        if e["media_path"]:
            name = f"entry {idx} ({e['media_path']})"
        if e["media"] == "video":
            dec = decode_video(e["media_path"], num_frames=cfg.num_frames, fps=cfg.fps,
                               max_frames=cfg.max_frames, start=e["start"], end=e["end"])
            frames, times, indices = dec.frames, dec.times, dec.indices
            timing = dec.extra.get("timing")
        elif e["media"] == "image":
            frames, times, indices = [load_image(e["media_path"])], [0.0], [0]
            timing = None
        else:
            frames, times, indices = [], [], []
            timing = None
        frames = [resize_frame(f, cfg.image_size, cfg.resize_mode) for f in frames]
        meta = {"conversations": e["conversations"], "media": e["media"],
                "source": e["source"], "id": e["id"], "num_frames": len(frames),
                "frame_times": [round(t, 6) for t in times], "frame_indices": indices,
                "start": e["start"], "end": e["end"], "image_size": cfg.image_size,
                "frame_timing": timing}
        sample = {"__key__": key, "json": json.dumps(meta).encode("utf-8")}
        ext = "png" if cfg.image_format == "png" else "jpg"
        for i, f in enumerate(frames):
            sample[f"{i:04d}.{ext}"] = encode_frame(f, cfg.image_format, cfg.jpeg_quality)
        return "ok", key, (sample, len(frames))
    except (AnnotationError, MediaError) as err:
        return "skip", name, str(err)
    except Exception as err:  # noqa: BLE001 - anything else about one entry skips that entry
        return "skip", name, f"{type(err).__name__}: {err}"


# ----------------------------------------------------------------------------- shards

def write_tar_index(tar_path: str, idx_path: str):
    """megatron-energon's ``<shard>.tar.idx``: little-endian uint64 byte offsets of each
    sample's first tar header, then the offset where the archive's members end (what
    ``energon prepare`` writes), so energon can read the shards without re-preparing them."""
    import struct
    import tarfile
    offsets, last = [], None
    with tarfile.open(tar_path, mode="r:") as tar:
        for m in tar:
            base = os.path.basename(m.name).split(".", 1)[0]
            key = os.path.join(os.path.dirname(m.name), base)
            if key != last:
                offsets.append(m.offset)
                last = key
        offsets.append(tar.offset)
    tmp = idx_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack(f"<{len(offsets)}Q", *offsets))
    os.replace(tmp, idx_path)


class AtomicShardWriter:
    """Rotating webdataset TarWriter; each shard is written as ``<name>.tmp`` and renamed when
    closed, so an interrupted run never leaves a half-written ``.tar`` behind."""

    def __init__(self, out_dir: str, max_bytes: int, max_samples: int, pattern="shard-%06d.tar"):
        self.out_dir, self.max_bytes, self.max_samples = out_dir, max_bytes, max_samples
        self.pattern = pattern
        self.shards: List[Tuple[str, int]] = []  # (file name, sample count)
        self._f = self._tw = None
        self._count = 0
        self._tmp = None

    def _open(self):
        import webdataset as wds
        name = self.pattern % len(self.shards)
        self._name = name
        self._tmp = os.path.join(self.out_dir, name + ".tmp")
        self._f = open(self._tmp, "wb")
        self._tw = wds.TarWriter(self._f, encoder=False)
        self._count = 0

    def write(self, sample: Dict[str, Any]):
        size = sum(len(v) + 1024 for k, v in sample.items() if k != "__key__")
        if self._tw is not None and self._count > 0 and (
                self._count >= self.max_samples or self._f.tell() + size > self.max_bytes):
            self.close_shard()
        if self._tw is None:
            self._open()
        self._tw.write(sample)
        self._count += 1

    def close_shard(self):
        if self._tw is None:
            return
        self._tw.close()  # closes the file too
        final = os.path.join(self.out_dir, self._name)
        write_tar_index(self._tmp, final[:-len(".tar")] + ".tar.idx")
        os.replace(self._tmp, final)
        self.shards.append((self._name, self._count))
        self._tw = self._f = self._tmp = None

    def abort(self):
        if self._tw is not None:
            try:
                self._tw.close()
            except Exception:  # noqa: BLE001
                pass
            if self._tmp and os.path.exists(self._tmp):
                os.remove(self._tmp)
            self._tw = self._f = self._tmp = None


def write_energon_metadata(out_dir: str, shards: List[Tuple[str, int]], extra: Dict[str, Any]):
    """megatron-energon's dataset metadata (CrudeWebdataset; all shards in the train split)."""
    import yaml
    meta = os.path.join(out_dir, META_DIR)
    os.makedirs(meta, exist_ok=True)
    counts = {name: int(n) for name, n in shards}

    def dump(name, text):
        tmp = os.path.join(meta, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(meta, name))

    dump("dataset.yaml", yaml.safe_dump({"__module__": "megatron.energon",
                                         "__class__": "CrudeWebdataset",
                                         "subflavors": {"longvila": "video_conversation"}},
                                        sort_keys=False))
    dump("split.yaml", yaml.safe_dump({"split_parts": {"train": list(counts), "val": [],
                                                       "test": []}, "exclude": []},
                                      sort_keys=False))
    dump(".info.yaml", yaml.safe_dump({"shard_counts": counts}, sort_keys=False))
    dump(".info.json", json.dumps({"energon_version": None, "shard_counts": counts}, indent=2))
    dump(LONGVILA_META, json.dumps(extra, indent=2))


STAGING_PREFIX = ".preprocess-staging-"
RETIRED_PREFIX = ".preprocess-old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(out_dir: str):
    """Staging directories of runs that died (their process is gone) are removed."""
    for name in os.listdir(out_dir):
        if name.startswith(STAGING_PREFIX):
            try:
                pid = int(name[len(STAGING_PREFIX):])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def _commit(staging: str, out_dir: str, old: List[str]):
    """Replace ``out_dir``'s dataset (``old`` shard files + ``.nv-meta``) by ``staging``'s. The
    old metadata is retired first and the new one moved in last: whatever instant a crash
    hits, ``out_dir`` is never a dataset whose metadata describes other shards."""
    retired = os.path.join(out_dir, f"{RETIRED_PREFIX}{os.getpid()}")
    os.makedirs(retired, exist_ok=True)
    meta = os.path.join(out_dir, META_DIR)
    if os.path.exists(meta):
        os.replace(meta, os.path.join(retired, META_DIR))
    for f in old:
        os.replace(os.path.join(out_dir, f), os.path.join(retired, f))
    for f in sorted(os.listdir(staging)):
        if f != META_DIR:
            os.replace(os.path.join(staging, f), os.path.join(out_dir, f))
    os.replace(os.path.join(staging, META_DIR), meta)  # the commit point
    shutil.rmtree(retired, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)


def _ordered_results(executor, jobs, window: int):
    """``process_entry`` over ``jobs`` in a process pool, results in input order, at most
    ``window`` in flight. A worker that dies (SIGKILL, the out-of-memory killer) breaks the
    pool: that is raised as a PreprocessError naming the entries in flight, never waited on."""
    from collections import deque
    from concurrent.futures.process import BrokenProcessPool
    pending = deque()
    it = iter(jobs)
    try:
        for job in itertools.islice(it, window):
            pending.append((job, executor.submit(process_entry, job)))
        while pending:
            job, fut = pending.popleft()
            res = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, executor.submit(process_entry, nxt)))
            yield res
    except BrokenProcessPool:
        busy = [str(j[0]) for j, _ in [(job, None)] + list(pending)][:8]
        raise PreprocessError(
            f"a preprocessing worker process died (killed by a signal, e.g. the out-of-memory "
            f"killer) while entries {', '.join(busy)} were in progress; nothing was committed "
            f"(lower --workers or the video sizes and run again)") from None


def preprocess(annotation_path: str, out_dir: str, media_root: Optional[str] = None,
               config: Optional[PreprocessConfig] = None, **overrides) -> PreprocessSummary:
    """Annotation file + media -> shards and metadata in ``out_dir``; returns the summary."""
    cfg = config or PreprocessConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown preprocess option {k!r}")
        setattr(cfg, k, v)
    if cfg.image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be jpg or png, not {cfg.image_format!r}")
    t0 = time.perf_counter()
    media_root = media_root if media_root is not None else os.path.dirname(os.path.abspath(annotation_path))
    os.makedirs(out_dir, exist_ok=True)
    old = [f for f in os.listdir(out_dir) if f.endswith((".tar", ".tar.tmp", ".tar.idx", ".tar.idx.tmp"))]
    if old and not cfg.overwrite:
        raise FileExistsError(f"{out_dir} already holds shards ({old[0]}, ...); "
                              f"pass overwrite=True / --overwrite to replace them")
    entries = read_annotations(annotation_path)
    _remove_stale_staging(out_dir)
    staging = os.path.join(out_dir, f"{STAGING_PREFIX}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    summary = PreprocessSummary()
    writer = AtomicShardWriter(staging, cfg.shard_max_bytes, cfg.shard_max_samples)
    jobs = [(idx, e, media_root, cfg) for idx, e in entries]
    pool = None
    try:
        if cfg.num_workers > 1:
            from concurrent.futures import ProcessPoolExecutor
            pool = ProcessPoolExecutor(cfg.num_workers, mp_context=mp.get_context("fork"))
            results = _ordered_results(pool, jobs, window=4 * cfg.num_workers)
        else:
            results = map(process_entry, jobs)
        bar = None
        if cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(jobs), desc="preprocess", unit="video", file=sys.stderr,
                       disable=None)
        for status, name, payload in results:
            if status == "ok":
                sample, nf = payload
                writer.write(sample)
                summary.written += 1
                summary.frames += nf
                summary.bytes += sum(len(v) for k, v in sample.items() if k != "__key__")
            else:
                log.warning("skipped %s: %s", name, payload)
                summary.skipped.append((name, payload))
                if cfg.strict:
                    raise PreprocessError(f"{name}: {payload}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        writer.close_shard()
        if summary.written == 0:
            first = f"; first: {summary.skipped[0][0]}: {summary.skipped[0][1]}" \
                if summary.skipped else ""
            raise PreprocessError(f"{annotation_path}: no sample written ({len(entries)} "
                                  f"entries, {len(summary.skipped)} skipped{first}); "
                                  f"{out_dir} left as it was")
        summary.shards = [n for n, _ in writer.shards]
        summary.seconds = time.perf_counter() - t0
        settings = asdict(cfg)
        settings.pop("progress", None)
        write_energon_metadata(staging, writer.shards, {
            "format": "megatron-longvila/v1", "settings": settings,
            "shards": {n: c for n, c in writer.shards},
            "summary": {"written": summary.written, "skipped": summary.skipped,
                        "frames": summary.frames, "bytes": summary.bytes}})
        _commit(staging, out_dir, old)
    except BaseException:
        writer.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
    return summary
