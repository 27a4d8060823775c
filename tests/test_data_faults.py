"""Bad input and faults in the data path (issue 14 cases 1, 5, 10, 11, 12, 16, 18): nothing
lost, nothing silently wrong, no hang, one line naming the shard and key (or file and line)."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

from megatron_longvila.data import build_train_loader
from megatron_longvila.data.loader import BadSampleError, DatasetError, read_dataset
from megatron_longvila.data.preprocess import (AtomicShardWriter, PreprocessError, preprocess,
                                                write_energon_metadata)
from megatron_longvila.data.synthetic import make_synthetic_videos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16


def conv(q="<video>\nWhat is shown?"):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": "A thing."}]


def jpeg(value=128):
    buf = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def sample(key, n_frames=2, announce=None, media="video", json_bytes=None):
    meta = {"conversations": conv(), "media": media,
            "num_frames": n_frames if announce is None else announce}
    s = {"__key__": key, "json": json.dumps(meta).encode() if json_bytes is None else json_bytes}
    for i in range(n_frames):
        s[f"{i:04d}.jpg"] = jpeg(10 * i)
    return s


def write_dataset(out, samples, count=None):
    out.mkdir(exist_ok=True)
    w = AtomicShardWriter(str(out), 1 << 30, 1000)
    for s in samples:
        w.write({k: v for k, v in s.items() if v is not None})
    w.close_shard()
    shards = w.shards if count is None else [(w.shards[0][0], count)]
    write_energon_metadata(str(out), shards, {})
    return str(out / shards[0][0])


def drain(path, **kw):
    loader = build_train_loader(path, "tiny", seq_length=512, image_size=SIZE, epochs=1,
                                shuffle=False, **{"num_workers": 0, **kw})
    try:
        batches = list(loader)
        return sum(int(b["num_samples"]) for b in batches), loader.stats()
    finally:
        loader.close()


def good(i):
    return sample(f"k{i:03d}")


# ------------------------------------------------------------------ case 1: --overwrite commit

def test_overwrite_that_dies_leaves_the_previous_dataset(tmp_path):
    ann = make_synthetic_videos(str(tmp_path / "raw"), num_videos=6, frames_per_video=6,
                                width=32, height=32, seed=0)
    out = tmp_path / "wds"
    preprocess(ann, str(out), num_frames=2, image_size=SIZE, shard_max_samples=2,
               progress=False)
    before = {f: open(out / f, "rb").read() for f in sorted(os.listdir(out)) if f.endswith(".tar")}
    meta_before = open(out / ".nv-meta" / ".info.json").read()
    entries = json.load(open(ann))
    entries.insert(4, {"video": "videos/missing.mp4", "conversations": conv()})
    ann2 = tmp_path / "raw" / "ann2.json"
    ann2.write_text(json.dumps(entries))
    with pytest.raises(PreprocessError, match="missing.mp4"):
        preprocess(str(ann2), str(out), num_frames=3, image_size=SIZE, shard_max_samples=2,
                   strict=True, overwrite=True, progress=False)
    after = {f: open(out / f, "rb").read() for f in sorted(os.listdir(out)) if f.endswith(".tar")}
    assert after == before  # the old shards, untouched, and only them
    assert open(out / ".nv-meta" / ".info.json").read() == meta_before
    assert sorted(os.listdir(out)) == sorted(list(before) + [f[:-4] + ".tar.idx" for f in before]
                                             + [".nv-meta"])  # no staging left behind
    n, _ = drain(str(out))
    assert n == 6
    # a complete rerun replaces it whole
    preprocess(ann, str(out), num_frames=3, image_size=SIZE, shard_max_samples=4,
               overwrite=True, progress=False)
    assert read_dataset(str(out)).total == 6 and len(read_dataset(str(out)).shards) == 2


# ------------------------------------------------------------------ case 5: frames vs metadata

@pytest.mark.parametrize("bad", ["announces_more", "zero_frames"])
def test_frames_missing_from_a_sample_stop_or_skip(tmp_path, bad):
    s = sample("kbad", n_frames=2, announce=4) if bad == "announces_more" else \
        sample("kbad", n_frames=0, announce=0)
    shard = write_dataset(tmp_path / "wds", [good(0), s, good(2)])
    with pytest.raises(BadSampleError) as ei:
        drain(str(tmp_path / "wds"))
    msg = str(ei.value)
    assert "kbad" in msg and shard in msg and "\n" not in msg
    assert ("announces 4 frames, the shard holds 2" in msg) if bad == "announces_more" \
        else ("without frames" in msg)
    n, stats = drain(str(tmp_path / "wds"), skip_bad_samples=1)
    assert n == 2 and stats["bad_samples_skipped"] == 1


def test_metadata_count_lower_than_the_shard_is_an_error(tmp_path):
    shard = write_dataset(tmp_path / "wds", [good(i) for i in range(3)], count=2)
    with pytest.raises(DatasetError, match="holds more samples than its metadata says"):
        drain(str(tmp_path / "wds"))
    assert shard


# ------------------------------------------------------------------ case 10: killed pool worker

def test_killed_preprocess_worker_is_an_error_not_a_hang(tmp_path):
    ann = make_synthetic_videos(str(tmp_path / "raw"), num_videos=4, frames_per_video=6,
                                width=32, height=32, seed=0)
    script = textwrap.dedent(f"""
        import os, signal, sys
        import importlib
        pp = importlib.import_module("megatron_longvila.data.preprocess")
        real = pp.process_entry
        def dying(args):
            if args[0] == 1:  # as the out-of-memory killer would
                os.kill(os.getpid(), signal.SIGKILL)
            return real(args)
        pp.process_entry = dying
        try:
            pp.preprocess({ann!r}, {str(tmp_path / 'wds')!r}, num_frames=2, image_size=16,
                          num_workers=2, progress=False)
        except pp.PreprocessError as e:
            print("error:", e, file=sys.stderr)
            sys.exit(2)
    """)
    try:
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    except subprocess.TimeoutExpired:
        pytest.fail("preprocess waited forever for a killed worker")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "worker process died" in r.stderr
    assert not os.path.exists(tmp_path / "wds" / ".nv-meta")


# ------------------------------------------------------------------ case 11: corrupt shards

@pytest.mark.parametrize("bad", ["corrupt_jpeg", "no_json", "bad_json", "cut_tar", "empty_tar"])
def test_bad_shard_content_one_line_or_skip_with_a_limit(tmp_path, bad):
    out = tmp_path / "wds"
    samples = [good(0), good(1), good(2), good(3)]
    if bad == "corrupt_jpeg":
        samples[1]["0001.jpg"] = samples[1]["0001.jpg"][:40]
    elif bad == "no_json":
        samples[1]["json"] = None
    elif bad == "bad_json":
        samples[1]["json"] = b"{not json"
    shard = write_dataset(out, samples)
    if bad == "cut_tar":
        with tarfile.open(shard) as tf:
            cut = [m for m in tf.getmembers() if m.name.startswith("k002")][0].offset_data + 100
        with open(shard, "r+b") as f:
            f.truncate(cut)
    elif bad == "empty_tar":
        with tarfile.open(shard, "w"):
            pass
    for workers in (0, 1):
        with pytest.raises(BadSampleError) as ei:
            drain(str(out), num_workers=workers)
        msg = str(ei.value)
        assert shard in msg and "\n" not in msg, msg
        assert "--skip-bad-samples" in msg
        if bad in ("corrupt_jpeg", "no_json", "bad_json"):
            assert "k001" in msg
    # a tar cut inside k002: k001 is lost too (the tar reader stops before handing it over)
    lost = {"corrupt_jpeg": 1, "no_json": 1, "bad_json": 1, "cut_tar": 3, "empty_tar": 4}[bad]
    n, stats = drain(str(out), skip_bad_samples=lost)
    assert n == 4 - lost and stats["bad_samples_skipped"] == lost
    if lost > 1:  # past the limit: stops, naming it
        with pytest.raises(BadSampleError, match=f"more than --skip-bad-samples {lost - 1}"):
            drain(str(out), skip_bad_samples=lost - 1)


# ------------------------------------------------------------------ case 12: no .nv-meta

def test_dataset_without_metadata_is_caught_before_the_model(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    (d / "shard-000000.tar").write_bytes(b"")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_longvila.py"),
                        "--data-path", str(d), "--train-iters", "1"], capture_output=True,
                       text=True, timeout=600, cwd=str(tmp_path),
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
    assert ".nv-meta" in r.stderr and str(d) in r.stderr
    assert "parameters" not in r.stdout  # the model was never built
    assert "Traceback" not in r.stderr


# ------------------------------------------------------------------ case 16: annotation files

def test_annotation_encoding_and_empty_files(tmp_path):
    ann = make_synthetic_videos(str(tmp_path / "raw"), num_videos=3, frames_per_video=6,
                                width=32, height=32, seed=0)
    entries = json.load(open(ann))
    lines = [json.dumps(e).encode() for e in entries]
    lines.insert(1, json.dumps({"video": "videos/vid_0000.mp4",
                                "conversations": conv("<video>\ncaf\u00e9?")},
                               ensure_ascii=False).encode("latin-1"))
    lines.insert(3, b'{"video": "videos/vid_0001.mp4", "conversations": [')  # invalid JSON
    jl = tmp_path / "raw" / "ann.jsonl"
    jl.write_bytes(b"\n".join(lines) + b"\n")
    s = preprocess(str(jl), str(tmp_path / "wds"), num_frames=2, image_size=SIZE,
                   progress=False)
    assert s.written == 3
    reasons = [r for _, r in s.skipped]
    assert any(f"{jl} line 2: not valid UTF-8" in r for r in reasons), reasons
    assert any(f"{jl} line 4: not valid JSON" in r for r in reasons), reasons
    # a JSON list with a bad byte: the file and the line
    js = tmp_path / "raw" / "ann_list.json"
    js.write_bytes(b"[\n" + b",\n".join(lines[:1] + lines[1:2]) + b"\n]\n")
    cli = [sys.executable, os.path.join(ROOT, "tools", "preprocess_videos.py"), "--no-progress",
           "--num-frames", "2", "--image-size", str(SIZE), "--workers", "1"]
    r = subprocess.run(cli + ["--annotations", str(js), "--out", str(tmp_path / "o1")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and f"{js} line 3: not valid UTF-8" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # empty and all-bad annotation files: non-zero, nothing written
    empty = tmp_path / "raw" / "empty.jsonl"
    empty.write_text("")
    allbad = tmp_path / "raw" / "allbad.jsonl"
    allbad.write_text('{"video": "videos/missing.mp4", "conversations": []}\n{oops\n')
    for f in (empty, allbad):
        r = subprocess.run(cli + ["--annotations", str(f), "--out", str(tmp_path / f.stem)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "no sample written" in r.stderr, (f, r.stderr)
        assert not os.path.exists(tmp_path / f.stem / ".nv-meta")


# ------------------------------------------------------------------ case 18: media root

def test_media_outside_the_root_is_refused_and_no_absolute_path_is_stored(tmp_path):
    ann = make_synthetic_videos(str(tmp_path / "raw"), num_videos=2, frames_per_video=6,
                                width=32, height=32, seed=0)
    root = tmp_path / "raw"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.replace(root / "videos" / "vid_0001.mp4", outside / "vid_0001.mp4")
    os.symlink(outside / "vid_0001.mp4", root / "videos" / "link.mp4")
    entries = [json.load(open(ann))[0],
               {"video": "../elsewhere/vid_0001.mp4", "conversations": conv()},
               {"video": str(outside / "vid_0001.mp4"), "conversations": conv()},
               {"video": "videos/link.mp4", "conversations": conv()}]
    a = root / "ann.json"
    a.write_text(json.dumps(entries))
    s = preprocess(str(a), str(tmp_path / "wds"), media_root=str(root), num_frames=2,
                   image_size=SIZE, progress=False)
    assert s.written == 1 and len(s.skipped) == 3
    assert all("outside the media root" in r for _, r in s.skipped), s.skipped
    s = preprocess(str(a), str(tmp_path / "wds2"), media_root=str(root), num_frames=2,
                   image_size=SIZE, progress=False, allow_outside_media_root=True)
    assert s.written == 4
    with tarfile.open(str(tmp_path / "wds2" / "shard-000000.tar")) as tf:
        sources = [json.loads(tf.extractfile(m).read())["source"]
                   for m in tf.getmembers() if m.name.endswith(".json")]
    assert sources and not any(os.path.isabs(x) for x in sources), sources
    assert sources[0] == "videos/vid_0000.mp4"
