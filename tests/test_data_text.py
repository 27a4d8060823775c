"""Text corpora (stage 4): long documents are split across rows, never dropped; every token of
every document (but its first) is a target exactly once per epoch, across DP ranks and loader
workers; JSONL, parquet and Megatron indexed (.bin/.idx, written with megatron-core's builder)
read the same documents; blends with video shards and exact resume."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from megatron_longvila.constants import IGNORE_INDEX
from megatron_longvila.data import build_tokenizer, build_train_loader, make_synthetic_dataset

SEQ = 48


def documents(n=9, seed=0):
    """Texts from 3 to ~4 rows long (byte-level tiny tokenizer: a character is a token)."""
    g = np.random.default_rng(seed)
    words = ["video", "long", "context", "square", "moves", "red", "the", "of", "a"]
    out = []
    for k in range(n):
        m = int(g.integers(1, 40)) if k % 3 else int(g.integers(30, 45))
        out.append(f"doc{k}: " + " ".join(g.choice(words, m)))
    return out


def check_contract(batch, seq, mbs):
    toks, labs = batch["tokens"][0], batch["labels"][0]
    assert toks.shape == labs.shape == batch["position_ids"][0].shape == (seq * mbs,)
    cu = batch["cu_seqlens"].tolist()
    assert cu[0] == 0 and cu[-1] == seq * mbs and all(a < b for a, b in zip(cu, cu[1:]))
    for a, b in zip(cu, cu[1:]):
        assert torch.equal(batch["position_ids"][0, a:b], torch.arange(b - a))
        assert a // seq == (b - 1) // seq  # no segment crosses a row
    assert batch["frames_per_sample"].shape[0] == len(cu) - 1


def every_target_once(batches, doc_tokens, name):
    """Each segment is a document piece "<name>:d<doc>@<offset>": its tokens are the document's
    from that offset and its labels the next tokens of the same document. Returns the count of
    (doc, position) targets."""
    seen = Counter()
    for batch in batches:
        cu = batch["cu_seqlens"].tolist()
        keys = iter(batch["sample_keys"])
        for a, b in zip(cu, cu[1:]):
            t = batch["tokens"][0, a:b].tolist()
            lab = batch["labels"][0, a:b].tolist()
            if all(x == IGNORE_INDEX for x in lab) and b - a and set(t) <= {0, 256}:
                continue  # padding (pad id of the tiny tokenizer)
            key = next(keys)
            if not key.startswith(name + ":"):
                continue
            doc, off = key.split(":d")[1].split("@")
            doc, off = int(doc), int(off)
            ref = doc_tokens[doc]
            assert t == ref[off:off + len(t)], key
            for j, x in enumerate(lab):
                if x != IGNORE_INDEX:
                    assert x == ref[off + j + 1], (key, j)
                    seen[(doc, off + j + 1)] += 1
                else:  # only the document's last token has no target
                    assert off + j == len(ref) - 1, (key, j)
    return seen


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    docs = documents()
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": d, "id": k})
                                               for k, d in enumerate(docs)) + "\n")
    tok = build_tokenizer("tiny")
    ids = [tok.encode_text(d) + [tok.eos_id] for d in docs]
    return root, docs, ids, tok


@pytest.mark.parametrize("dp_size,workers", [(1, 0), (2, 2)])
def test_long_documents_every_token_once_per_epoch(corpus, dp_size, workers):
    root, docs, ids, tok = corpus
    assert max(len(x) for x in ids) > 3 * SEQ  # documents much longer than a row
    batches = []
    for r in range(dp_size):
        loader = build_train_loader(str(root / "docs.jsonl"), tok, seq_length=SEQ,
                                    micro_batch_size=2, dp_rank=r, dp_size=dp_size,
                                    num_workers=workers, epochs=1, seed=3)
        for b in loader:
            check_contract(b, SEQ, 2)
            assert b["frames"].shape[0] == 0
            batches.append(b)
        assert loader.stats()["dropped"] == 0
    seen = every_target_once(batches, ids, "docs.jsonl")
    want = {(d, p) for d, x in enumerate(ids) for p in range(1, len(x))}
    assert set(seen) == want
    assert set(seen.values()) == {1}
    # two epochs: exactly twice (and a new document order in the second)
    loader = build_train_loader(str(root / "docs.jsonl"), tok, seq_length=SEQ, num_workers=0,
                                epochs=2, seed=3)
    two = list(loader)
    assert set(every_target_once(two, ids, "docs.jsonl").values()) == {2}
    n = len(two) // 2
    assert [b["sample_keys"] for b in two[:n]] != [b["sample_keys"] for b in two[n:]]


def test_indexed_and_parquet_read_the_same_documents(corpus, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    import pyarrow as pa
    import pyarrow.parquet as pq
    root, docs, ids, tok = corpus
    pq.write_table(pa.table({"text": docs}), str(tmp_path / "docs.parquet"))
    # Megatron's format: one document made of two sequences, the others of one
    b = IndexedDatasetBuilder(str(tmp_path / "docs.bin"), dtype=np.int32)
    for k, x in enumerate(ids):
        if k == 4:
            b.add_item(torch.tensor(x[:7])), b.add_item(torch.tensor(x[7:]))
        else:
            b.add_item(torch.tensor(x))
        b.end_document()
    b.finalize(str(tmp_path / "docs.idx"))
    got = {}
    for name, path in [("docs.parquet", tmp_path / "docs.parquet"), ("docs", tmp_path / "docs"),
                       ("docs", tmp_path / "docs.bin")]:
        loader = build_train_loader(str(path), tok, seq_length=SEQ, num_workers=0, epochs=1,
                                    seed=3)
        batches = list(loader)
        seen = every_target_once(batches, ids, name)
        assert set(seen.values()) == {1}
        assert len(seen) == sum(len(x) - 1 for x in ids)
        got[str(path)] = [b["tokens"] for b in batches]
    a, b_, c = got.values()
    assert all(torch.equal(x, y) for x, y in zip(a, b_)) and len(a) == len(b_) == len(c)


def test_blend_with_video_and_exact_resume(corpus, tmp_path):
    root, docs, ids, tok = corpus
    vids = make_synthetic_dataset(str(tmp_path / "v"), num_videos=8, num_frames=2, image_size=16,
                                  seed=1, shard_max_samples=4)
    kw = dict(seq_length=256, micro_batch_size=1, tokens_per_frame=4, image_size=16,
              num_workers=2, seed=5)
    paths = ["0.5", vids, "0.5", str(root / "docs.jsonl")]
    ref = build_train_loader(paths, tok, **kw)
    first = [next(ref) for _ in range(12)]
    kinds = Counter("docs.jsonl" in k for b in first for k in b["sample_keys"])
    assert kinds[True] and kinds[False], kinds  # both sources in the stream
    assert ref.stats()["dropped"] == 0
    ref2 = build_train_loader(paths, tok, **kw)
    for _ in range(5):
        next(ref2)
    state = ref2.state_dict()
    ref2.close()
    resumed = build_train_loader(paths, tok, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for want in first[5:]:
        got = next(resumed)
        assert got["sample_keys"] == want["sample_keys"]
        for k in ("tokens", "labels", "position_ids", "cu_seqlens", "frames"):
            assert torch.equal(got[k], want[k]), k
    ref.close(), resumed.close()


def test_bad_text_input(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text'"):
        build_train_loader(str(tmp_path / "bad.jsonl"), "tiny", seq_length=16, num_workers=0)
    (tmp_path / "short.jsonl").write_text('{"text": "abc"}\n')
    with pytest.raises(ValueError, match="too few"):
        build_train_loader(str(tmp_path / "short.jsonl"), "tiny", seq_length=16, num_workers=0,
                           dp_size=2, dp_rank=0)
