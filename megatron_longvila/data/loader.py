"""The streaming, packing, resumable loader (see ``data/__init__.py`` for the contract).

Sample order (all of it a function of the seed, the DP rank/size and the worker count):
  epoch e of dataset d: its shards in an order shuffled by (seed, d, e); their samples form one
  stream of N samples; part p = dp_rank * W + worker (W = max(1, num_workers)) reads samples
  [N*p/(dp_size*W), N*(p+1)/(dp_size*W)) of it (so DP ranks are disjoint and cover the epoch),
  in blocks of ``shuffle_buffer`` samples, each permuted by an RNG seeded by (seed, d, e, p,
  block).
  blending: draw k of a worker picks dataset d with probability weight_d, from an RNG seeded by
  (seed, p, k).
  packing: greedy, in stream order; a sample that does not fit closes the row and opens the next.
State: per worker, the stream position where its next micro-batch starts (blend draw count,
(epoch, offset) per dataset, dropped/subsampled counts), and how many micro-batches were
delivered (which worker is next; torch's DataLoader serves workers round-robin). Restoring
enters each shard at the saved sample through energon's ``.tar.idx`` byte offsets and re-reads
at most one shuffle block, then continues exactly.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch

from ..constants import DEFAULT_IMAGE_TOKEN, DEFAULT_VIDEO_TOKEN
from .energon import expand_metadataset, is_metadataset
from .packing import build_micro_batch
from .task_encoder import IMAGE_EXTS, EncodedSample, SampleError, TaskEncoder, decode_frame_uint8
from .text import TextChunk, TextCursor, TextSpec, is_text_source
from .tokenizer import ChatTokenizer, build_tokenizer

log = logging.getLogger(__name__)

STATE_KEY = "_longvila_loader_state"
STATE_VERSION = 1
MAX_DROPS_IN_A_ROW = 1000


class BadSampleError(SampleError):
    """A sample that cannot be used (corrupt frame, missing or bad .json, frames missing, a tar
    cut short), or too many of them under ``skip_bad_samples``; one line naming the shard and
    the key."""


class DatasetError(ValueError):
    """A dataset whose metadata contradicts its shards (no sample may be dropped silently)."""


@dataclass
class DatasetSpec:
    path: str
    weight: float
    shards: List[Tuple[str, int]]  # (full path, sample count)
    kind = "webdataset"

    @property
    def total(self) -> int:
        return sum(c for _, c in self.shards)


def read_dataset(path: str, weight: float = 1.0, split: str = "train") -> DatasetSpec:
    """Shard list and counts of a dataset directory written by ``preprocess`` (or any energon
    webdataset: ``.nv-meta/.info.json`` / ``.info.yaml`` and ``split.yaml``); a text corpus
    (JSONL / parquet / Megatron indexed ``.bin``/``.idx``) -> a ``TextSpec`` (``data/text.py``)."""
    import yaml
    if is_text_source(path):
        return TextSpec(str(path), float(weight))
    meta = os.path.join(path, ".nv-meta")
    if not os.path.isdir(meta):
        raise FileNotFoundError(f"{path} is not a prepared dataset (no .nv-meta directory); "
                                f"run tools/preprocess_videos.py first")
    info_json, info_yaml = os.path.join(meta, ".info.json"), os.path.join(meta, ".info.yaml")
    if os.path.exists(info_json):
        with open(info_json) as f:
            counts = json.load(f)["shard_counts"]
    elif os.path.exists(info_yaml):
        with open(info_yaml) as f:
            counts = yaml.safe_load(f)["shard_counts"]
    else:
        raise FileNotFoundError(f"{meta} has neither .info.json nor .info.yaml")
    names = list(counts)
    split_file = os.path.join(meta, "split.yaml")
    if os.path.exists(split_file):
        with open(split_file) as f:
            parts = (yaml.safe_load(f) or {}).get("split_parts", {})
        if split in parts:
            names = list(parts[split])
    shards = []
    for n in names:
        full = os.path.join(path, n)
        if not os.path.exists(full):
            raise FileNotFoundError(f"shard {full} listed in {meta} does not exist")
        if n not in counts:
            raise ValueError(f"shard {n} of split {split!r} has no count in {meta}")
        shards.append((full, int(counts[n])))
    return DatasetSpec(path, float(weight), shards)


def parse_data_paths(data_paths) -> List[Tuple[str, float]]:
    """``"dir"``, ``["dir", ...]``, Megatron's ``[w1, "dir1", w2, "dir2"]`` or
    ``[("dir", w), ...]`` -> [(dir, weight)]."""
    if isinstance(data_paths, (str, os.PathLike)):
        return [(str(data_paths), 1.0)]
    items = list(data_paths)
    if not items:
        raise ValueError("no data paths given")
    if all(isinstance(x, (tuple, list)) for x in items):
        return [(str(p), float(w)) for p, w in items]

    def is_num(x):
        if isinstance(x, (int, float)):
            return True
        try:
            float(x)
            return not os.path.exists(str(x))
        except (TypeError, ValueError):
            return False

    if len(items) % 2 == 0 and all(is_num(items[i]) for i in range(0, len(items), 2)):
        out = [(str(items[i + 1]), float(items[i])) for i in range(0, len(items), 2)]
    else:
        out = [(str(p), 1.0) for p in items]
    if any(w < 0 for _, w in out) or sum(w for _, w in out) <= 0:
        raise ValueError(f"dataset weights must be >= 0 and not all 0: {out}")
    return out


def read_shard(path: str, start: int = 0) -> Iterator[Dict[str, Any]]:
    """Raw samples (bytes per field) of one tar from sample ``start`` on, via webdataset's tar
    iterator (no decoding). With energon's ``<shard>.tar.idx`` (written by preprocess) the file
    is entered at the sample's byte offset; without it the first samples are read and skipped."""
    from webdataset.tariterators import group_by_keys, tar_file_expander
    skip = start
    with open(path, "rb") as f:
        if start > 0:
            idx_path = path[:-len(".tar")] + ".tar.idx" if path.endswith(".tar") else path + ".idx"
            if os.path.exists(idx_path):
                with open(idx_path, "rb") as fi:
                    fi.seek(8 * start)
                    raw = fi.read(8)
                if len(raw) == 8:
                    f.seek(int(np.frombuffer(raw, dtype="<u8")[0]))
                    skip = 0
        files = tar_file_expander([{"url": path, "stream": f}])
        for j, sample in enumerate(group_by_keys(files)):
            if j >= skip:
                yield sample


class _Cursor:
    """One dataset's sample stream for one (rank, worker) part, positioned at (epoch, offset)."""

    def __init__(self, spec: DatasetSpec, d: int, cfg: "LoaderConfig", part: int, parts: int):
        self.spec, self.d, self.cfg, self.part, self.parts = spec, d, cfg, part, parts
        self.epoch, self.offset, self._it = 0, 0, None
        n = spec.total
        if n * (part + 1) // parts - n * part // parts == 0 and cfg.epochs is None:
            raise ValueError(f"dataset {spec.path} has {n} samples: too few for dp_size * "
                             f"workers = {parts} parts (each needs at least one)")

    def seek(self, epoch: int, offset: int):
        self.epoch, self.offset, self._it = int(epoch), int(offset), None

    def _epoch_order(self, epoch: int):
        order = np.arange(len(self.spec.shards))
        if self.cfg.shuffle:
            order = np.random.default_rng([self.cfg.seed, self.d, epoch]).permutation(len(order))
        return order

    def _raw(self, epoch: int, start: int):
        """Raw samples of this part's range of the epoch, from the range's sample ``start``."""
        shards = self.spec.shards
        n = self.spec.total
        a, b = n * self.part // self.parts, n * (self.part + 1) // self.parts
        a += start
        pos = 0
        for i in self._epoch_order(epoch):
            path, c = shards[int(i)]
            if pos + c <= a:
                pos += c
                continue
            if pos >= b:
                break
            first, stop = max(0, a - pos), min(c, b - pos)
            nxt, key, error, extra = first, None, None, None
            it = read_shard(path, first)
            try:
                for sample in it:
                    if nxt >= stop:
                        extra = sample
                        break
                    key = sample.get("__key__")
                    nxt += 1
                    yield sample
            except (tarfile.TarError, OSError, EOFError, ValueError, KeyError) as e:
                detail = e.args[0] if e.args else e
                detail = str(detail[0] if isinstance(detail, tuple) and detail else detail)
                error = (f"tar unreadable after sample {key}" if key else "tar unreadable"
                         ) + f" ({type(e).__name__}: {detail.split(' @ ')[0][:160]})"
            finally:
                it.close()
            if extra is not None and stop == c:  # the end of the shard: nothing may follow
                raise DatasetError(
                    f"shard {path} holds more samples than its metadata says ({c}; sample "
                    f"{extra.get('__key__')} and on would be dropped): re-run "
                    f"tools/preprocess_videos.py or fix its .nv-meta")
            if nxt < stop:  # samples the metadata promises but the tar does not hold
                why = error or f"the shard holds {nxt} samples, its metadata says {c}"
                for k in range(nxt, stop):
                    yield {"__bad__": f"sample #{k} of shard {path} is missing: {why}",
                           "__url__": path, "__key__": f"#{k}"}
            pos += c

    def _epoch_iter(self, epoch: int, offset: int):
        """This part's samples of the epoch from ``offset`` on. Shuffling permutes blocks of
        ``shuffle_buffer`` consecutive samples (RNG seeded by seed, dataset, epoch, part,
        block), so a position is restored by reading one block, not by replaying the epoch."""
        B = self.cfg.shuffle_buffer if self.cfg.shuffle and self.cfg.shuffle_buffer > 1 else 1
        block = offset // B
        within = offset - block * B
        raw = self._raw(epoch, block * B)
        while True:
            buf = list(itertools.islice(raw, B))
            if not buf:
                return
            order = range(len(buf))
            if B > 1:
                order = np.random.default_rng([self.cfg.seed, self.d, epoch, self.part, block]
                                              ).permutation(len(buf))
            for k in order[within:]:
                yield buf[int(k)]
            within = 0
            block += 1

    def next(self):
        """Next raw sample; StopIteration when ``epochs`` is set and they are done."""
        while True:
            if self.cfg.epochs is not None and self.epoch >= self.cfg.epochs:
                raise StopIteration
            if self._it is None:
                self._it = self._epoch_iter(self.epoch, self.offset)
            try:
                x = next(self._it)
                self.offset += 1
                return x
            except StopIteration:
                self.epoch, self.offset, self._it = self.epoch + 1, 0, None


def _check_sample(raw: Dict[str, Any]):
    """What the task encoder cannot see: the frames the sample's .json announces are all in
    the shard, and a video/image sample has frames (else it would silently train as text)."""
    if "json" not in raw:
        return  # the encoder names it
    try:
        meta = json.loads(raw["json"])
    except (ValueError, UnicodeDecodeError):
        return
    if not isinstance(meta, dict):
        return
    n = sum(1 for k in raw if not k.startswith("__") and k.rsplit(".", 1)[-1] in IMAGE_EXTS)
    declared = meta.get("num_frames")
    if isinstance(declared, int) and declared != n:
        raise SampleError(f"its .json announces {declared} frames, the shard holds {n}")
    if n == 0:
        markers = any(isinstance(t, dict) and isinstance(t.get("value"), str) and (
            DEFAULT_VIDEO_TOKEN in t["value"] or DEFAULT_IMAGE_TOKEN in t["value"])
            for t in meta.get("conversations") or [])
        if meta.get("media") in ("video", "image") or markers:
            raise SampleError(f"a {meta.get('media') or 'media'} sample without frames "
                              f"(it would train as text)")


@dataclass
class LoaderConfig:
    seq_length: int
    micro_batch_size: int
    tokens_per_frame: int
    image_size: int
    dp_rank: int
    dp_size: int
    seed: int
    num_workers: int
    num_frames: Optional[int]
    drop_or_subsample: str
    shuffle: bool
    shuffle_buffer: int
    epochs: Optional[int]
    skip_bad_samples: int = 0  # bad samples each loading process may skip before it stops


def _initial_worker_state(n_datasets: int) -> Dict[str, Any]:
    return {"draws": 0, "datasets": [[0, 0] for _ in range(n_datasets)], "dropped": 0,
            "subsampled": 0, "bad": 0}


class _Source:
    """Encoded samples of one worker part, blended over datasets, with drop/subsample."""

    def __init__(self, specs, cfg: LoaderConfig, encoder: TaskEncoder, part: int, parts: int,
                 state: Dict[str, Any]):
        self.cfg, self.encoder, self.part = cfg, encoder, part
        self.cursors = [(TextCursor if s.kind == "text" else _Cursor)(s, d, cfg, part, parts)
                        for d, s in enumerate(specs)]
        self.weights = np.array([s.weight for s in specs], dtype=np.float64)
        self.draws = int(state["draws"])
        for c, (e, o) in zip(self.cursors, state["datasets"]):
            c.seek(e, o)
        self.dropped, self.subsampled = int(state["dropped"]), int(state["subsampled"])
        self.bad = int(state.get("bad", 0))
        self.dead = set()

    def snapshot(self) -> Dict[str, Any]:
        return {"draws": self.draws, "datasets": [[c.epoch, c.offset] for c in self.cursors],
                "dropped": self.dropped, "subsampled": self.subsampled, "bad": self.bad}

    def _bad_sample(self, raw: Dict[str, Any], reason: str):
        """The bad-sample policy: stop with one line naming shard and key, or (under
        ``skip_bad_samples``) log it, count it and go on until the limit is passed."""
        key, url = raw.get("__key__", "?"), raw.get("__url__", "?")
        what = reason if "__bad__" in raw else f"bad sample {key} in shard {url}: {reason}"
        limit = self.cfg.skip_bad_samples
        if limit <= 0:
            raise BadSampleError(f"{what} (--skip-bad-samples N skips up to N such samples)")
        self.bad += 1
        if self.bad > limit:
            raise BadSampleError(f"{what}; {self.bad} bad samples, more than "
                                 f"--skip-bad-samples {limit}")
        log.warning("skipped %s (%d of at most %d bad samples)", what, self.bad, limit)

    def _choose(self) -> int:
        w = self.weights.copy()
        for d in self.dead:
            w[d] = 0
        if w.sum() <= 0:
            raise StopIteration
        if len(w) == 1:
            return 0
        u = np.random.default_rng([self.cfg.seed, self.part, self.draws, 2]).random()
        return int(min(np.searchsorted(np.cumsum(w) / w.sum(), u, side="right"), len(w) - 1))

    def __iter__(self):
        cfg = self.cfg
        run_of_drops = 0
        while True:
            snap = self.snapshot()
            try:
                d = self._choose()
            except StopIteration:
                return
            try:
                raw = self.cursors[d].next()
            except StopIteration:
                self.dead.add(d)
                continue
            self.draws += 1
            if isinstance(raw, TextChunk):
                s = raw
            elif "__bad__" in raw:
                self._bad_sample(raw, raw["__bad__"])
                continue
            else:
                try:
                    _check_sample(raw)
                    s = self.encoder.encode_sample(raw, d)
                except SampleError as e:
                    where = f"sample {raw.get('__key__', '?')} of {raw.get('__url__', '?')}: "
                    msg = str(e)
                    self._bad_sample(raw, msg[len(where):] if msg.startswith(where) else msg)
                    continue
            if s.packed_length(cfg.tokens_per_frame) > cfg.seq_length:
                sub = None
                if cfg.drop_or_subsample == "subsample":
                    sub = self.encoder.subsample_to_fit(s, cfg.seq_length, cfg.tokens_per_frame)
                if sub is None:
                    self.dropped += 1
                    run_of_drops += 1
                    if run_of_drops >= MAX_DROPS_IN_A_ROW:
                        raise ValueError(
                            f"{run_of_drops} samples in a row are longer than seq_length="
                            f"{cfg.seq_length} (with tokens_per_frame={cfg.tokens_per_frame}); "
                            f"raise seq_length, lower num_frames or use drop_or_subsample='subsample'")
                    continue
                self.subsampled += 1
                s = sub
            run_of_drops = 0
            try:  # decoded here, where the bad-sample policy applies, not in the packer
                if not isinstance(s, TextChunk):
                    s.frames = [decode_frame_uint8(f, cfg.image_size, f"frame {i}")
                                for i, f in enumerate(s.frames)]
            except SampleError as e:
                self._bad_sample(raw, str(e))
                continue
            yield snap, s


class PackedStream(torch.utils.data.IterableDataset):
    """Micro-batches of one DP rank; in a DataLoader each worker produces its own part."""

    def __init__(self, specs: List[DatasetSpec], cfg: LoaderConfig, encoder: TaskEncoder,
                 pad_id: int):
        self.specs, self.cfg, self.encoder, self.pad_id = specs, cfg, encoder, pad_id
        self.worker_states: List[Dict[str, Any]] = []
        self.rotation = 0

    def iter_worker(self, logical: int) -> Iterator[dict]:
        cfg = self.cfg
        W = max(1, cfg.num_workers)
        part = cfg.dp_rank * W + logical
        src = _Source(self.specs, cfg, self.encoder, part, cfg.dp_size * W,
                      self.worker_states[logical])
        try:
            yield from self._iter_source(src, logical)
        except (BadSampleError, DatasetError) as e:
            # One line for the trainer: from a DataLoader worker an exception would arrive
            # wrapped in the worker's traceback.
            yield {STATE_KEY: {"worker": logical, "state": copy.deepcopy(src.snapshot()),
                               "error": [type(e).__name__, str(e)]}}

    def _iter_source(self, src: "_Source", logical: int) -> Iterator[dict]:
        cfg = self.cfg
        it = iter(src)
        pending: Optional[Tuple[dict, EncodedSample]] = None
        done = False
        while not done:
            rows: List[List[EncodedSample]] = []
            for _ in range(cfg.micro_batch_size):
                row, used = [], 0
                while True:
                    if pending is None:
                        try:
                            pending = next(it)
                        except StopIteration:
                            done = True
                            break
                    L = pending[1].packed_length(cfg.tokens_per_frame)
                    if used + L > cfg.seq_length:
                        break
                    row.append(pending[1])
                    used += L
                    pending = None
                if row:
                    rows.append(row)
                if done:
                    break
            if not rows:
                # End of a finite stream: hand the final counts (drops) to the main process.
                yield {STATE_KEY: {"worker": logical, "state": copy.deepcopy(src.snapshot()),
                                   "final": True}}
                return
            resume = pending[0] if pending is not None else src.snapshot()
            batch = build_micro_batch(rows, cfg.seq_length, cfg.micro_batch_size,
                                      cfg.tokens_per_frame, self.pad_id, cfg.image_size,
                                      normalize=True)  # in the worker: the trainer process
            # then only maps the shared-memory tensor (measured: ~10 ms vs ~32 ms of main-process
            # CPU per 32x384px micro-batch when uint8 was sent and normalised here)
            batch[STATE_KEY] = {"worker": logical, "state": copy.deepcopy(resume)}
            yield batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        W = max(1, self.cfg.num_workers)
        phys = info.id if info is not None else 0
        return self.iter_worker((phys + self.rotation) % W)


def _leave_sigterm_to_the_trainer(_worker_id):
    """A loader worker inherits the trainer's Python SIGTERM handler when the trainer handles
    SIGTERM itself (``--exit-signal-handler``): Slurm signals every process of the job, and the
    worker must keep serving the step the trainer finishes before it saves (the trainer stops
    its workers itself; they exit with it otherwise)."""
    import signal
    if callable(signal.getsignal(signal.SIGTERM)):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class LongVILALoader:
    """Iterator of micro-batches with ``state_dict()`` / ``load_state_dict()`` (JSON-able)."""

    def __init__(self, specs: List[DatasetSpec], cfg: LoaderConfig, tokenizer: ChatTokenizer,
                 prefetch_factor: int = 2):
        if cfg.drop_or_subsample not in ("drop", "subsample"):
            raise ValueError(f"drop_or_subsample must be 'drop' or 'subsample', "
                             f"not {cfg.drop_or_subsample!r}")
        if not 0 <= cfg.dp_rank < cfg.dp_size:
            raise ValueError(f"dp_rank {cfg.dp_rank} not in [0, dp_size={cfg.dp_size})")
        if cfg.seq_length <= 0 or cfg.micro_batch_size <= 0 or cfg.tokens_per_frame <= 0:
            raise ValueError("seq_length, micro_batch_size and tokens_per_frame must be positive")
        if not any(s.total for s in specs):
            raise ValueError(f"no samples in {[s.path for s in specs]}")
        parts = cfg.dp_size * max(1, cfg.num_workers)
        for s in specs:
            if s.total < parts and cfg.epochs is None:
                raise ValueError(f"dataset {s.path} has {s.total} samples: too few for dp_size * "
                                 f"max(1, num_workers) = {parts} parts (each needs at least one)")
        self.specs, self.cfg, self.tokenizer = specs, cfg, tokenizer
        self.prefetch_factor = prefetch_factor
        self.encoder = TaskEncoder(tokenizer, num_frames=cfg.num_frames)
        self._stream = PackedStream(specs, cfg, self.encoder, tokenizer.pad_id)
        W = max(1, cfg.num_workers)
        self._state = {"version": STATE_VERSION, "batches": 0,
                       "workers": [_initial_worker_state(len(specs)) for _ in range(W)],
                       "config": self._identity()}
        self._it = None
        self._dl_iter = None

    def _identity(self) -> Dict[str, Any]:
        c = self.cfg
        return {"datasets": [[s.weight, s.total] for s in self.specs],
                "dp_rank": c.dp_rank, "dp_size": c.dp_size, "num_workers": max(1, c.num_workers),
                "seed": c.seed, "seq_length": c.seq_length, "micro_batch_size": c.micro_batch_size,
                "tokens_per_frame": c.tokens_per_frame, "num_frames": c.num_frames,
                "drop_or_subsample": c.drop_or_subsample, "shuffle": c.shuffle,
                "shuffle_buffer": c.shuffle_buffer, "epochs": c.epochs}

    # -- state
    def state_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: Dict[str, Any]):
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a loader state of version {STATE_VERSION}: {str(state)[:200]}")
        mine, theirs = self._identity(), state.get("config", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise ValueError("loader state was saved with other settings; it would not resume "
                             "the same stream: " + ", ".join(f"{k}: saved {a!r}, now {b!r}"
                                                             for k, (a, b) in diff.items()))
        self._shutdown()
        self._state = copy.deepcopy(state)

    def stats(self) -> Dict[str, int]:
        w = self._state["workers"]
        return {"batches": self._state["batches"], "dropped": sum(x["dropped"] for x in w),
                "subsampled": sum(x["subsampled"] for x in w),
                "bad_samples_skipped": sum(x.get("bad", 0) for x in w)}

    # -- iteration
    def _start(self):
        W = max(1, self.cfg.num_workers)
        self._stream.worker_states = copy.deepcopy(self._state["workers"])
        self._stream.rotation = self._state["batches"] % W
        if self.cfg.num_workers <= 0:
            self._it = self._stream.iter_worker(0)
        else:
            dl = torch.utils.data.DataLoader(self._stream, batch_size=None,
                                             num_workers=self.cfg.num_workers,
                                             prefetch_factor=self.prefetch_factor,
                                             multiprocessing_context="fork",
                                             worker_init_fn=_leave_sigterm_to_the_trainer)
            self._dl_iter = iter(dl)
            self._it = self._dl_iter

    def _shutdown(self):
        if self._dl_iter is not None and hasattr(self._dl_iter, "_shutdown_workers"):
            self._dl_iter._shutdown_workers()
        self._dl_iter = None
        self._it = None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        while True:
            batch = next(self._it)
            meta = batch.pop(STATE_KEY)
            if meta.get("error"):
                kind, msg = meta["error"]
                raise (DatasetError if kind == "DatasetError" else BadSampleError)(msg)
            self._state["workers"][int(meta["worker"])] = meta["state"]
            if not meta.get("final"):
                break
        self._state["batches"] += 1
        return batch

    def close(self):
        self._shutdown()

    def __del__(self):
        try:
            self._shutdown()
        except Exception:  # noqa: BLE001
            pass


def default_data_parallel() -> Tuple[int, int]:
    """(rank, size) of the data-parallel group (excluding context parallelism) when Megatron's
    model parallel state is initialised, else (0, 1)."""
    try:
        from megatron.core import parallel_state as ps
        if ps.model_parallel_is_initialized():
            return (ps.get_data_parallel_rank(with_context_parallel=False),
                    ps.get_data_parallel_world_size(with_context_parallel=False))
    except ImportError:
        pass
    return 0, 1


def build_train_loader(data_paths, tokenizer: Union[str, ChatTokenizer], seq_length: int,
                       micro_batch_size: int = 1, tokens_per_frame: int = 1,
                       image_size: int = 384, dp_rank: Optional[int] = 0,
                       dp_size: Optional[int] = 1,
                       seed: int = 1234, num_workers: int = 2, num_frames: Optional[int] = None,
                       drop_or_subsample: str = "drop", shuffle: bool = True,
                       shuffle_buffer: int = 64, epochs: Optional[int] = None,
                       prefetch_factor: int = 2, text_key: str = "text",
                       skip_bad_samples: int = 0) -> LongVILALoader:
    """See ``megatron_longvila/data/__init__.py``. ``dp_rank=None``/``dp_size=None`` take them
    from Megatron's parallel_state (data-parallel group without context parallelism: TP, PP and
    CP/SP ranks of one DP rank share the batches)."""
    if dp_rank is None or dp_size is None:
        r, w = default_data_parallel()
        dp_rank = r if dp_rank is None else dp_rank
        dp_size = w if dp_size is None else dp_size
    if isinstance(tokenizer, str):
        tokenizer = build_tokenizer(tokenizer)
    pairs = []
    for p, w in parse_data_paths(data_paths):  # energon metadatasets -> their weighted datasets
        pairs.extend([(q, w * iw) for q, iw in expand_metadataset(p)] if is_metadataset(p)
                     else [(p, w)])
    specs = [read_dataset(p, w) for p, w in pairs]
    for s in specs:
        if s.kind == "text":
            s.text_key = text_key
            s.prepare(tokenizer, int(seq_length))
    cfg = LoaderConfig(int(seq_length), int(micro_batch_size), int(tokens_per_frame),
                       int(image_size), int(dp_rank), int(dp_size), int(seed), int(num_workers),
                       None if num_frames is None else int(num_frames), drop_or_subsample,
                       bool(shuffle), int(shuffle_buffer), None if epochs is None else int(epochs),
                       int(skip_bad_samples or 0))
    return LongVILALoader(specs, cfg, tokenizer, prefetch_factor=prefetch_factor)
