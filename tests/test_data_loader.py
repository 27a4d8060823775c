"""Loader on real decoded video: synthetic mp4 -> shards -> packed micro-batches, checked against
a direct PyAV decode and against token ids built here from the chat-template definitions;
data-parallel split, SP ranks, resume, blending, drop/subsample, text-only, no unpickling."""

import json
import os
import pickle

import av
import numpy as np
import pytest
import torch
from PIL import Image

from megatron_longvila.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from megatron_longvila.data import build_tokenizer, build_train_loader, make_synthetic_dataset
from megatron_longvila.data.preprocess import AtomicShardWriter, preprocess, write_energon_metadata

SIZE, NF = 32, 4


# ----------------------------------------------------------------------------- references

def pyav_frames(path, n, size):
    """n uniformly spaced frames decoded plainly with PyAV, shorter side -> size, centre crop."""
    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    out = []
    for k in np.round(np.linspace(0, len(frames) - 1, n)).astype(int):
        img = Image.fromarray(frames[k])
        w, h = img.size
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC)
        l, t = (nw - size) // 2, (nh - size) // 2
        out.append(np.asarray(img.crop((l, t, l + size, t + size))))
    return np.stack(out)


def b(s):
    return list(s.encode("utf-8"))


def tiny_ids():
    vocab = build_tokenizer("tiny").hf.get_vocab()
    return {k: vocab[k] for k in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")}


def expected_qwen2(conversations, n_frames, tpf, system="You are a helpful assistant."):
    """ChatML ids for the byte-level tiny tokenizer, written out from the template's definition,
    and the shifted labels the contract asks for."""
    sp = tiny_ids()
    S, E = sp["<|im_start|>"], sp["<|im_end|>"]
    ids, tgt = [], []

    def add(x, t=False):
        ids.extend(x)
        tgt.extend([t] * len(x))
    add([S] + b("system\n" + system) + [E] + b("\n"))
    for turn in conversations:
        if turn["from"] == "human":
            add([S] + b("user\n"))
            v = turn["value"]
            if "<video>" in v:
                pre, post = v.split("<video>\n") if "<video>\n" in v else v.split("<video>")
                add(b(pre))
                for _ in range(n_frames):
                    add([IMAGE_TOKEN_INDEX] * tpf + b("\n"))
                add(b(post))
            else:
                add(b(v))
            add([E] + b("\n"))
        else:
            add([S] + b("assistant\n"))
            add(b(turn["value"]) + [E], True)
            add(b("\n"))
    labels = [ids[i + 1] if tgt[i + 1] else IGNORE_INDEX for i in range(len(ids) - 1)] + [IGNORE_INDEX]
    return ids, labels


def segments(batch):
    cu = batch["cu_seqlens"].tolist()
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    path = make_synthetic_dataset(str(root), num_videos=16, num_frames=NF, image_size=SIZE,
                                  seed=5, shard_max_samples=3, resize_mode="crop")
    ann = json.load(open(os.path.join(str(root), "raw", "annotations.json")))
    return path, os.path.join(str(root), "raw"), ann


@pytest.fixture(scope="module")
def ds_png(tmp_path_factory):
    root = tmp_path_factory.mktemp("dspng")
    path = make_synthetic_dataset(str(root), num_videos=6, num_frames=3, image_size=SIZE,
                                  seed=9, shard_max_samples=2, image_format="png",
                                  resize_mode="crop")
    return path, os.path.join(str(root), "raw"), json.load(open(os.path.join(str(root), "raw", "annotations.json")))


@pytest.fixture(scope="module")
def text_ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    entries = [{"conversations": [{"from": "human", "value": f"Say {i}."},
                                  {"from": "gpt", "value": f"{i}"}]} for i in range(40)]
    (root / "t.jsonl").write_text("\n".join(json.dumps(e) for e in entries))
    out = str(root / "wds")
    preprocess(str(root / "t.jsonl"), out, key_prefix="t", shard_max_samples=10, progress=False)
    return out, entries


def collect(loader, n=None):
    out = []
    for i, batch in enumerate(loader):
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out


def assert_same(b1, b2):
    assert b1.keys() == b2.keys()
    for k in b1:
        if torch.is_tensor(b1[k]):
            assert torch.equal(b1[k], b2[k]), k
        else:
            assert b1[k] == b2[k], k


# ----------------------------------------------------------------------------- tests

def check_batch_contract(batch, seq, mbs, tpf, pad_id):
    S = seq * mbs
    for k in ("tokens", "labels", "position_ids"):
        assert batch[k].shape == (1, S) and batch[k].dtype == torch.int64, k
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == S
    fps = batch["frames_per_sample"]
    assert fps.dtype == torch.int64 and len(fps) == len(cu) - 1
    assert batch["frames"].dtype == torch.float32 and batch["frames"].shape[0] == int(fps.sum())
    assert batch["frames"].shape[1:] == (3, SIZE, SIZE)
    toks = batch["tokens"][0]
    assert int((toks == IMAGE_TOKEN_INDEX).sum()) == int(fps.sum()) * tpf
    # rows never split a sample
    for a, e in segments(batch):
        assert a // seq == (e - 1) // seq
        assert torch.equal(batch["position_ids"][0, a:e], torch.arange(e - a))
    n_pad = sum(1 for a, e in segments(batch) if (toks[a:e] == pad_id).all())
    assert len(segments(batch)) - n_pad == batch["num_samples"] == len(batch["sample_keys"])


def test_batches_match_pyav_and_chat_template(ds):
    path, raw, ann = ds
    tpf, seq, mbs = 4, 300, 2
    tok = build_tokenizer("tiny")
    loader = build_train_loader([path], tok, seq_length=seq, micro_batch_size=mbs,
                                tokens_per_frame=tpf, image_size=SIZE, num_workers=0, epochs=1,
                                seed=1)
    batches = collect(loader)
    seen = []
    for batch in batches:
        check_batch_contract(batch, seq, mbs, tpf, tok.pad_id)
        f0 = 0
        segs = [s for s, n in zip(segments(batch), batch["frames_per_sample"].tolist())]
        keys = iter(batch["sample_keys"])
        for (a, e), nf in zip(segs, batch["frames_per_sample"].tolist()):
            if (batch["tokens"][0, a:e] == tok.pad_id).all():
                assert (batch["labels"][0, a:e] == IGNORE_INDEX).all() and nf == 0
                continue
            key = next(keys)
            i = int(key[1:])
            entry = ann[i]
            ids, labels = expected_qwen2(entry["conversations"], NF, tpf)
            assert batch["tokens"][0, a:e].tolist() == ids
            assert batch["labels"][0, a:e].tolist() == labels
            assert nf == NF
            want = pyav_frames(os.path.join(raw, entry["video"]), NF, SIZE).astype(np.float32)
            want = (want / 255.0 - 0.5) / 0.5
            got = batch["frames"][f0:f0 + nf].permute(0, 2, 3, 1).numpy()
            err = np.abs(got - want).mean()
            assert err < 0.03, (key, err)  # JPEG: a few grey levels
            f0 += nf
            seen.append(key)
        assert f0 == batch["frames"].shape[0]
    assert loader.stats()["dropped"] == 0
    assert sorted(seen) == [f"s{i:08d}" for i in range(16)]


def test_frames_exact_with_png_shards(ds_png):
    path, raw, ann = ds_png
    loader = build_train_loader(path, "tiny", seq_length=400, tokens_per_frame=2,
                                image_size=SIZE, num_workers=0, epochs=1)
    n = 0
    for batch in loader:
        f0 = 0
        for key, nf in zip(batch["sample_keys"], [x for x in batch["frames_per_sample"].tolist()]):
            want = pyav_frames(os.path.join(raw, ann[int(key[1:])]["video"]), 3, SIZE)
            want = torch.from_numpy(((want.astype(np.float32) / 255.0 - 0.5) / 0.5)).permute(0, 3, 1, 2)
            assert torch.equal(batch["frames"][f0:f0 + 3], want)
            f0 += 3
            n += 1
    assert n == 6


def test_hf_chat_template_agrees(tmp_path):
    """Our ids, decoded, equal transformers' apply_chat_template with the Qwen2 / Llama-3 jinja
    templates; the Llama-3 template is guessed from a locally built tokenizer's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from megatron_longvila.data.task_encoder import TaskEncoder
    conv = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A square."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Red."}]
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "<image>\n<image>\nWhat moves?"},
            {"role": "assistant", "content": "A square."}, {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "Red."}]
    qwen_jinja = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                  "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
    llama_jinja = ("{% for message in messages %}{% set content = '<|start_header_id|>' + "
                   "message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
                   "{% endif %}{{ content }}{% endfor %}")
    # Llama-3-like tokenizer built here: byte-level, its own specials only.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                          "<|end_header_id|>", "<|eot_id|>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|begin_of_text|>",
                                 eos_token="<|eot_id|>")
    hf.save_pretrained(tmp_path / "llama3tok")
    cases = [(build_tokenizer("tiny"), qwen_jinja),
             (build_tokenizer(str(tmp_path / "llama3tok")), llama_jinja)]
    assert cases[1][0].template.name == "llama3"
    for tok, jinja in cases:
        ids, tgt = TaskEncoder(tok).encode_conversation(conv, 2)
        text = "".join("<image>" if i == IMAGE_TOKEN_INDEX else tok.hf.decode([i]) for i in ids)
        ref = tok.hf.apply_chat_template(msgs, tokenize=False, chat_template=jinja)
        assert text == ref
        answers = tok.hf.decode([i for i, t_ in zip(ids, tgt) if t_])
        end = "<|im_end|>" if tok.template.name == "qwen2" else "<|eot_id|>"
        assert answers == f"A square.{end}Red.{end}"
        assert max(i for i in ids) < 512


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["the square moves left", "the disc is red", "what colour"] * 50))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=24, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                   minloglevel=2)
    tok = build_tokenizer(str(tmp_path / "sp.model"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    from megatron_longvila.data.task_encoder import TaskEncoder
    ids, tgt = TaskEncoder(tok).encode_conversation(
        [{"from": "human", "value": "<video>\nwhat colour"}, {"from": "gpt", "value": "red"}], 1)
    S, E = sp.piece_to_id("<|im_start|>"), sp.piece_to_id("<|im_end|>")
    assert ids.count(S) == 3 and ids.count(E) == 3 and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert [i for i, t in zip(ids, tgt) if t] == sp.encode("red") + [E]


def test_dp_split_disjoint_union_and_sp_ranks_identical(ds):
    path, _, _ = ds
    kw = dict(seq_length=300, micro_batch_size=1, tokens_per_frame=4, image_size=SIZE, seed=3,
              epochs=1, dp_size=2)
    keys = []
    for rank in range(2):
        for nw in (0, 2):
            got = [k for bt in build_train_loader(path, "tiny", dp_rank=rank, num_workers=nw, **kw)
                   for k in bt["sample_keys"]]
            assert len(got) == len(set(got)) == 8
            if nw == 0:
                keys.append(set(got))
            else:
                assert set(got) == keys[rank]  # workers split the rank's part, nothing else
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] == {f"s{i:08d}" for i in range(16)}
    # two ranks of one SP/TP group (same dp_rank) get identical batches
    kw.update(epochs=None, num_workers=2, dp_rank=1)
    a = collect(build_train_loader(path, "tiny", **kw), 4)
    b_ = collect(build_train_loader(path, "tiny", **kw), 4)
    for x, y in zip(a, b_):
        assert_same(x, y)
    # a different seed gives a different order
    kw.update(seed=4)
    c = collect(build_train_loader(path, "tiny", **kw), 4)
    assert [x["sample_keys"] for x in a] != [x["sample_keys"] for x in c]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(ds, text_ds, num_workers):
    path, _, _ = ds
    tpath, _ = text_ds
    kw = dict(seq_length=300, micro_batch_size=2, tokens_per_frame=4, image_size=SIZE, seed=11,
              num_workers=num_workers, dp_rank=1, dp_size=2, shuffle_buffer=4)
    data = [0.7, path, 0.3, tpath]
    n, k = 10, 3  # 10 micro-batches cross several epochs of rank 1's 8 videos
    full = collect(build_train_loader(data, "tiny", **kw), n)
    l1 = build_train_loader(data, "tiny", **kw)
    first = collect(l1, k)
    state = json.loads(json.dumps(l1.state_dict()))
    l1.close()
    for x, y in zip(first, full[:k]):
        assert_same(x, y)
    l2 = build_train_loader(data, "tiny", **kw)
    l2.load_state_dict(state)
    rest = collect(l2, n - k)
    for x, y in zip(rest, full[k:]):
        assert_same(x, y)
    assert l2.state_dict()["batches"] == n
    keys = [kk for bt in full for kk in bt["sample_keys"] if kk.startswith("s")]
    assert len(keys) > 8 + 4  # the stream went past the rank's epoch
    # the state refuses other settings
    bad = build_train_loader(data, "tiny", **dict(kw, seed=12))
    with pytest.raises(ValueError, match="seed"):
        bad.load_state_dict(state)


def test_blending_weights_and_text_only(ds, text_ds):
    path, _, _ = ds
    tpath, entries = text_ds
    loader = build_train_loader([(path, 1.0), (tpath, 3.0)], "tiny", seq_length=256,
                                tokens_per_frame=1, image_size=SIZE, num_workers=0, seed=2)
    n_text = n_vid = 0
    for bt in collect(loader, 40):
        n_text += sum(1 for kk in bt["sample_keys"] if kk.startswith("t"))
        n_vid += sum(1 for kk in bt["sample_keys"] if kk.startswith("s"))
    frac = n_text / (n_text + n_vid)
    assert 0.65 < frac < 0.85, frac
    # text only: no frames at all, still the contract
    loader = build_train_loader(tpath, "tiny", seq_length=128, tokens_per_frame=4, image_size=SIZE,
                                num_workers=0, epochs=1, shuffle=False)
    total = 0
    for bt in loader:
        assert bt["frames"].shape == (0, 3, SIZE, SIZE)
        assert (bt["frames_per_sample"] == 0).all()
        for (a, e), key in zip(segments(bt), bt["sample_keys"]):
            i = int(key[1:])
            ids, labels = expected_qwen2(entries[i]["conversations"], 0, 4)
            assert bt["tokens"][0, a:e].tolist() == ids and bt["labels"][0, a:e].tolist() == labels
        total += bt["num_samples"]
    assert total == 40 and loader.stats()["dropped"] == 0


def test_too_long_samples_drop_or_subsample(ds):
    path, _, _ = ds
    # text ~ 90-150 tokens + 4 frames x 40 tokens: nothing with 4 frames fits in 200
    kw = dict(seq_length=200, tokens_per_frame=40, image_size=SIZE, num_workers=0, epochs=1)
    dropped = build_train_loader(path, "tiny", drop_or_subsample="drop", **kw)
    got = collect(dropped)
    assert sum(b_["num_samples"] for b_ in got) + dropped.stats()["dropped"] == 16
    assert dropped.stats()["dropped"] == 16
    sub = build_train_loader(path, "tiny", drop_or_subsample="subsample", **kw)
    got = collect(sub)
    kept = sum(b_["num_samples"] for b_ in got)
    assert kept + sub.stats()["dropped"] == 16 and sub.stats()["subsampled"] == kept > 0
    for b_ in got:
        check_batch_contract(b_, 200, 1, 40, build_tokenizer("tiny").pad_id)
        assert 1 <= max(b_["frames_per_sample"].tolist()) < NF


def test_shards_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    out = tmp_path / "wds"
    out.mkdir()
    w = AtomicShardWriter(str(out), 1 << 20, 100)
    meta = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    for i in range(2):
        w.write({"__key__": f"k{i}", "json": json.dumps(meta).encode(),
                 "pyd": pickle.dumps(Evil()), "pickle": pickle.dumps(Evil()),
                 "pth": pickle.dumps(Evil())})
    w.close_shard()
    write_energon_metadata(str(out), w.shards, {})
    got = collect(build_train_loader(str(out), "tiny", seq_length=128, image_size=SIZE,
                                     num_workers=0, epochs=1))
    assert sum(b_["num_samples"] for b_ in got) == 2
    assert not marker.exists()


def test_clear_errors(tmp_path, ds):
    path, _, _ = ds
    with pytest.raises(FileNotFoundError, match="nv-meta"):
        build_train_loader(str(tmp_path), "tiny", seq_length=64, num_workers=0)
    with pytest.raises(ValueError, match="drop_or_subsample"):
        build_train_loader(path, "tiny", seq_length=64, num_workers=0, drop_or_subsample="cut")
    with pytest.raises(ValueError, match="too few"):
        build_train_loader(path, "tiny", seq_length=64, num_workers=0, dp_size=32, dp_rank=0)
    with pytest.raises(ValueError, match="in a row are longer than seq_length"):
        next(build_train_loader(path, "tiny", seq_length=16, num_workers=0))
    with pytest.raises(ValueError, match="tokenizer"):
        build_tokenizer(str(tmp_path / "nope"))


def test_num_frames_subset_and_image_samples(ds_png, tmp_path):
    path, raw, ann = ds_png
    loader = build_train_loader(path, "tiny", seq_length=400, tokens_per_frame=3, image_size=SIZE,
                                num_workers=0, epochs=1, num_frames=2)
    n = 0
    for batch in loader:
        assert (batch["frames_per_sample"][: batch["num_samples"]] == 2).all()
        for j, key in enumerate(batch["sample_keys"]):
            want = pyav_frames(os.path.join(raw, ann[int(key[1:])]["video"]), 3, SIZE)[[0, 2]]
            want = torch.from_numpy((want.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)
            assert torch.equal(batch["frames"][2 * j:2 * j + 2], want)
            n += 1
    assert n == 6
    # an image is a one-frame video with its <image> marker kept in place
    img = (np.random.default_rng(1).random((40, 50, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    conv = [{"from": "human", "value": "Look: <image>\nWhat is it?"}, {"from": "gpt", "value": "Noise."}]
    (tmp_path / "a.json").write_text(json.dumps([{"image": "a.png", "conversations": conv}] * 2))
    preprocess(str(tmp_path / "a.json"), str(tmp_path / "wds"), image_size=SIZE, image_format="png",
               progress=False)
    bt = next(build_train_loader(str(tmp_path / "wds"), "tiny", seq_length=300, tokens_per_frame=5,
                                 image_size=SIZE, num_workers=0, epochs=1))
    assert bt["frames_per_sample"].tolist() == [1, 1, 0] and bt["frames"].shape[0] == 2
    a, e = segments(bt)[0]
    sp = tiny_ids()
    S, E = sp["<|im_start|>"], sp["<|im_end|>"]
    want_ids = ([S] + b("system\nYou are a helpful assistant.") + [E] + b("\n") + [S] + b("user\nLook: ")
                + [IMAGE_TOKEN_INDEX] * 5 + b("\nWhat is it?") + [E] + b("\n") + [S] + b("assistant\n")
                + b("Noise.") + [E] + b("\n"))
    assert bt["tokens"][0, a:e].tolist() == want_ids


def test_resume_reads_one_block_not_the_epoch(ds, tmp_path, monkeypatch):
    import shutil
    import megatron_longvila.data.loader as L
    path, _, _ = ds
    # entering a shard at sample k (through .tar.idx) == reading it from the start and skipping
    shard = os.path.join(path, sorted(f for f in os.listdir(path) if f.endswith(".tar"))[0])
    shutil.copy(shard, tmp_path / "noidx.tar")
    full = [s_["__key__"] for s_ in L.read_shard(shard)]
    for k in range(len(full)):
        assert [s_["__key__"] for s_ in L.read_shard(shard, k)] == full[k:]
        assert [s_["__key__"] for s_ in L.read_shard(str(tmp_path / "noidx.tar"), k)] == full[k:]
    reads = []
    real = L.read_shard

    def counting(p, start=0):
        for s_ in real(p, start):
            reads.append(s_["__key__"])
            yield s_
    monkeypatch.setattr(L, "read_shard", counting)
    kw = dict(seq_length=300, tokens_per_frame=4, image_size=SIZE, num_workers=0, seed=7,
              shuffle_buffer=3)
    l1 = build_train_loader(path, "tiny", **kw)
    collect(l1, 6)
    state = json.loads(json.dumps(l1.state_dict()))
    offset = state["workers"][0]["datasets"][0][1]
    assert offset >= 9 and len(reads) >= offset
    nxt = next(l1)
    reads.clear()
    l2 = build_train_loader(path, "tiny", **kw)
    l2.load_state_dict(state)
    assert_same(next(l2), nxt)
    # one shuffle block (3) before the saved offset at most, plus what the batch itself needs
    assert len(reads) <= 3 + nxt["num_samples"] + 3, (offset, reads)
