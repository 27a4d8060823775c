"""Text corpora for long-context training (stage 4): documents packed into rows and split across
rows, never dropped.

Sources (a ``--data-path`` entry, blended with video shard directories by Megatron's weights):
  ``*.jsonl`` / ``*.json`` (one JSON object per line)  and ``*.parquet``: the ``text`` field of
      each record is a document; it is tokenised (no specials) and the tokenizer's eos id is
      appended. Tokenised once when the loader is built, held in memory: for large corpora
      write Megatron's indexed format instead (Megatron-LM's tools/preprocess_data.py).
  a Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``, given as ``PREFIX``, ``PREFIX.bin``
      or ``PREFIX.idx``): read through megatron-core's ``IndexedDataset`` (memory-mapped); a
      document is the run of sequences its document index says, taken as is (Megatron's
      preprocessing appends the end-of-document token itself).

The stream: epoch e concatenates the documents in an order shuffled by (seed, dataset, e).
Row k of the epoch holds stream tokens [k*L, k*L + L) and is trained on the tokens
[k*L + 1, k*L + L + 1) (L = seq_length): rows overlap by one token, as Megatron's GPT dataset
samples do, so every token of every document except its first is a target exactly once per
epoch. Inside a row, each document's piece is its own segment (cu_seqlens; positions restart at
0); the label of a document's last token is not the next document's first (IGNORE_INDEX).
Rows of the epoch are split into contiguous parts, one per (DP rank, loader worker).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from ..constants import IGNORE_INDEX

TEXT_SUFFIXES = (".jsonl", ".json", ".parquet")


def is_text_source(path: str) -> bool:
    p = str(path)
    return p.endswith(TEXT_SUFFIXES) or indexed_prefix(p) is not None


def indexed_prefix(path: str) -> Optional[str]:
    """The ``.bin``/``.idx`` prefix of a Megatron indexed dataset named by ``path``, else None."""
    p = str(path)
    for suffix in (".bin", ".idx"):
        if p.endswith(suffix):
            p = p[:-len(suffix)]
            break
    if os.path.isfile(p + ".bin") and os.path.isfile(p + ".idx"):
        return p
    return None


@dataclass
class TextChunk:
    """One row's worth of a text stream (the loader packs it like a sample: it fills a row)."""
    key: str  # "<dataset>:e<epoch>:r<row>"
    tokens: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n] (already shifted)
    seg_lens: List[int]  # one per document piece
    seg_keys: List[str]  # "<dataset>:d<doc>@<offset>" per piece
    dataset: int = 0
    num_frames: int = 0
    frames: list = field(default_factory=list)

    def packed_length(self, tokens_per_frame: int = 1) -> int:
        return int(len(self.tokens))


class _MemoryDocs:
    """Documents held as one token array (JSONL / parquet text, tokenised once)."""

    def __init__(self, docs: Sequence[np.ndarray]):
        self.lengths = np.array([len(d) for d in docs], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tokens = np.concatenate(docs).astype(np.int64) if len(docs) else np.zeros(0, np.int64)

    def read(self, doc: int, offset: int, length: int) -> np.ndarray:
        a = self.starts[doc] + offset
        return self.tokens[a:a + length]


class _IndexedDocs:
    """A Megatron indexed dataset through megatron-core (memory-mapped, opened lazily so that
    forked loader workers open their own maps)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        ds = self._open()
        seq_lens = np.array(ds.sequence_lengths, dtype=np.int64)  # copies: the maps close
        di = np.array(ds.document_indices, dtype=np.int64)
        self.doc_seqs = di
        seq_starts = np.concatenate([[0], np.cumsum(seq_lens)])
        self.seq_lens, self.seq_starts = seq_lens, seq_starts
        self.lengths = seq_starts[di[1:]] - seq_starts[di[:-1]]
        self._ds = None

    def _open(self):
        from megatron.core.datasets.indexed_dataset import IndexedDataset
        try:
            return IndexedDataset(self.prefix, multimodal=False, mmap=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read the Megatron indexed dataset {self.prefix}(.bin/.idx): "
                             f"{type(e).__name__}: {e}") from e

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_ds"] = None
        return d

    def read(self, doc: int, offset: int, length: int) -> np.ndarray:
        if self._ds is None:
            self._ds = self._open()
        first, last = int(self.doc_seqs[doc]), int(self.doc_seqs[doc + 1])
        base = self.seq_starts[first]
        out = []
        a, b = offset, offset + length  # token range inside the document
        for s in range(first, last):
            s0, s1 = self.seq_starts[s] - base, self.seq_starts[s + 1] - base
            lo, hi = max(a, s0), min(b, s1)
            if lo < hi:
                out.append(np.asarray(self._ds.get(s, offset=int(lo - s0), length=int(hi - lo)),
                                      dtype=np.int64))
        return np.concatenate(out) if out else np.zeros(0, np.int64)


def _read_records(path: str, text_key: str) -> List[str]:
    texts = []
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        table = pq.read_table(path)
        if text_key not in table.column_names:
            raise ValueError(f"{path}: no column {text_key!r} (columns: {table.column_names})")
        for k, v in enumerate(table.column(text_key).to_pylist()):
            if not isinstance(v, str):
                raise ValueError(f"{path}: row {k}: {text_key!r} is {type(v).__name__}, not text")
            texts.append(v)
        return texts
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a JSON object per line ({e})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get(text_key), str):
                raise ValueError(f"{path}:{n}: no string field {text_key!r}")
            texts.append(rec[text_key])
    return texts


@dataclass
class TextSpec:
    """A text corpus in a blend (the loader's DatasetSpec counterpart)."""
    path: str
    weight: float
    kind: str = "text"
    text_key: str = "text"
    docs: object = None
    seq_length: int = 0

    def prepare(self, tokenizer, seq_length: int) -> "TextSpec":
        self.seq_length = int(seq_length)
        if self.docs is not None:
            return self
        prefix = indexed_prefix(self.path)
        if prefix is not None:
            self.docs = _IndexedDocs(prefix)
        else:
            if not os.path.isfile(self.path):
                raise FileNotFoundError(f"text corpus {self.path} does not exist")
            eos = int(tokenizer.eos_id)
            self.docs = _MemoryDocs([np.asarray(tokenizer.encode_text(t) + [eos], dtype=np.int64)
                                     for t in _read_records(self.path, self.text_key)])
        if int(self.docs.lengths.sum()) < 2:
            raise ValueError(f"text corpus {self.path} has fewer than 2 tokens")
        return self

    @property
    def name(self) -> str:
        """The corpus' name in sample keys (file name; an indexed dataset's prefix name)."""
        return os.path.basename(indexed_prefix(self.path) or self.path)

    @property
    def num_tokens(self) -> int:
        return int(self.docs.lengths.sum())

    @property
    def total(self) -> int:
        """Rows per epoch."""
        return -(-(self.num_tokens - 1) // self.seq_length)

    def epoch_order(self, seed: int, d: int, epoch: int, shuffle: bool) -> np.ndarray:
        n = len(self.docs.lengths)
        if not shuffle:
            return np.arange(n)
        return np.random.default_rng([seed, d, epoch, 7]).permutation(n)

    def chunk(self, order: np.ndarray, cum: np.ndarray, row: int, d: int, epoch: int) -> TextChunk:
        """Row ``row`` of the epoch whose document order is ``order`` (``cum``: cumulative
        lengths in that order, with a leading 0)."""
        L, T = self.seq_length, int(cum[-1])
        a, b = row * L, min(row * L + L + 1, T)  # input [a, b-1) (or [a, b) at the end), targets +1
        n_in = min(L, T - a)
        i = int(np.searchsorted(cum, a, side="right") - 1)
        toks, labs, lens, keys = [], [], [], []
        pos = a
        name = self.name
        while pos < a + n_in:
            doc = int(order[i])
            off = pos - int(cum[i])
            doc_end = int(cum[i + 1])
            take = min(doc_end, a + n_in) - pos
            # tokens of this piece and, if the document goes on past the row, its next token
            extra = 1 if (pos + take < doc_end and pos + take < b) else 0
            piece = self.docs.read(doc, off, take + extra)
            t = piece[:take]
            lab = np.full(take, IGNORE_INDEX, dtype=np.int64)
            lab[:take - 1] = t[1:]
            if extra:
                lab[take - 1] = piece[take]
            toks.append(t)
            labs.append(lab)
            lens.append(int(take))
            keys.append(f"{name}:d{doc}@{off}")
            pos += take
            i += 1
        return TextChunk(f"{name}:e{epoch}:r{row}", np.concatenate(toks).astype(np.int64),
                         np.concatenate(labs), lens, keys, d)


class TextCursor:
    """A text corpus' rows for one (rank, worker) part, positioned at (epoch, offset)."""

    def __init__(self, spec: TextSpec, d: int, cfg, part: int, parts: int):
        self.spec, self.d, self.cfg, self.part, self.parts = spec, d, cfg, part, parts
        self.epoch, self.offset = 0, 0
        self._epoch_cache = None
        n = spec.total
        if n * (part + 1) // parts - n * part // parts == 0 and cfg.epochs is None:
            raise ValueError(f"text corpus {spec.path} gives {n} rows of {spec.seq_length} tokens: "
                             f"too few for dp_size * workers = {parts} parts (each needs one)")

    def seek(self, epoch: int, offset: int):
        self.epoch, self.offset = int(epoch), int(offset)

    def _order(self, epoch):
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = self.spec.epoch_order(self.cfg.seed, self.d, epoch, self.cfg.shuffle)
            cum = np.concatenate([[0], np.cumsum(self.spec.docs.lengths[order])])
            self._epoch_cache = (epoch, order, cum)
        return self._epoch_cache[1], self._epoch_cache[2]

    def next(self) -> TextChunk:
        n = self.spec.total
        while True:
            if self.cfg.epochs is not None and self.epoch >= self.cfg.epochs:
                raise StopIteration
            a, b = n * self.part // self.parts, n * (self.part + 1) // self.parts
            if a + self.offset < b:
                order, cum = self._order(self.epoch)
                c = self.spec.chunk(order, cum, a + self.offset, self.d, self.epoch)
                self.offset += 1
                return c
            self.epoch, self.offset = self.epoch + 1, 0
