"""Preprocessing on real video: synthetic mp4/webm/mkv -> shards, compared with a direct PyAV
decode; bad input; energon metadata; atomic shards; the CLI."""

import io
import json
import os
import subprocess
import sys
import tarfile

import av
import numpy as np
import pytest
import yaml
from PIL import Image

from megatron_longvila.data.preprocess import PreprocessError, preprocess
from megatron_longvila.data.synthetic import make_synthetic_videos, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


def pyav_all_frames(path):
    """Reference: every frame of the file, decoded plainly with PyAV, as RGB arrays."""
    with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def ref_crop(arr, size):
    """Reference resize: shorter side to ``size`` (bicubic), centre crop."""
    img = Image.fromarray(arr)
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), Image.BICUBIC)
    l, t = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((l, t, l + size, t + size)))


def read_tar_samples(out_dir):
    """Samples of every shard, read with the stdlib tarfile (independent of our loader)."""
    samples = {}
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(out_dir, name)) as tf:
            for m in tf.getmembers():
                key, field = m.name.split(".", 1)
                samples.setdefault(key, {})[field] = tf.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def raw_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    ann = make_synthetic_videos(str(d), num_videos=6, frames_per_video=14, width=48, height=40,
                                seed=3, extensions=(".mp4", ".webm", ".mkv"))
    return str(d), ann


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_frames_equal_direct_pyav_decode(raw_videos, tmp_path, fmt):
    raw, ann = raw_videos
    n = 5
    out = str(tmp_path / "wds")
    summary = preprocess(ann, out, num_frames=n, image_size=SIZE, image_format=fmt,
                         shard_max_samples=2, num_workers=2, progress=False, resize_mode="crop")
    entries = json.load(open(ann))
    assert summary.written == len(entries) and not summary.skipped
    assert summary.frames == n * len(entries)
    samples = read_tar_samples(out)
    assert sorted(samples) == [f"s{i:08d}" for i in range(len(entries))]
    for i, e in enumerate(entries):
        s = samples[f"s{i:08d}"]
        meta = json.loads(s["json"])
        assert meta["conversations"] == e["conversations"]
        ref = pyav_all_frames(os.path.join(raw, e["video"]))
        idx = np.round(np.linspace(0, len(ref) - 1, n)).astype(int)
        assert meta["frame_indices"] == idx.tolist()
        for j, k in enumerate(idx):
            got = np.asarray(Image.open(io.BytesIO(s[f"{j:04d}.{fmt}"])).convert("RGB")).astype(int)
            want = ref_crop(ref[k], SIZE).astype(int)
            assert got.shape == (SIZE, SIZE, 3)
            if fmt == "png":
                np.testing.assert_array_equal(got, want)
            else:
                err = np.abs(got - want).mean()
                assert err < 4.0, err
                # and it is that frame, not a neighbour (the shapes move every frame)
                other = ref_crop(ref[k + 1 if k + 1 < len(ref) else k - 1], SIZE).astype(int)
                assert np.abs(got - other).mean() > err


def test_energon_metadata_and_shard_bounds(raw_videos, tmp_path):
    raw, ann = raw_videos
    out = str(tmp_path / "wds")
    preprocess(ann, out, num_frames=3, image_size=SIZE, shard_max_samples=4,
               shard_max_bytes=6000, progress=False)
    meta = os.path.join(out, ".nv-meta")
    info = yaml.safe_load(open(os.path.join(meta, ".info.yaml")))["shard_counts"]
    assert json.load(open(os.path.join(meta, ".info.json")))["shard_counts"] == info
    split = yaml.safe_load(open(os.path.join(meta, "split.yaml")))
    assert split["split_parts"]["train"] == sorted(info)
    ds = yaml.safe_load(open(os.path.join(meta, "dataset.yaml")))
    assert ds["__class__"] == "CrudeWebdataset" and ds["__module__"] == "megatron.energon"
    tars = sorted(f for f in os.listdir(out) if f.endswith(".tar"))
    assert tars == sorted(info) and len(tars) >= 2
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    total = 0
    for t in tars:
        with tarfile.open(os.path.join(out, t)) as tf:
            members = tf.getmembers()
            end = tf.offset
        keys = {m.name.split(".")[0] for m in members}
        assert len(keys) == info[t] <= 4
        # energon's <shard>.tar.idx: offset of each sample's first header, then the end
        idx = np.fromfile(os.path.join(out, t + ".idx"), dtype="<u8").tolist()
        firsts = [m.offset for i, m in enumerate(members)
                  if i == 0 or m.name.split(".")[0] != members[i - 1].name.split(".")[0]]
        assert idx == firsts + [end] and len(idx) == info[t] + 1
        total += len(keys)
        # bounded: a shard only exceeds the byte limit when one sample alone does
        assert os.path.getsize(os.path.join(out, t)) <= 6000 or info[t] == 1
    assert total == 6


def test_fps_sampling_segments_and_images(raw_videos, tmp_path):
    raw, ann = raw_videos
    entries = json.load(open(ann))
    e0 = dict(entries[0], start=0.5, end=1.25)
    img = tmp_path / "still.png"
    arr = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(img)
    e_img = {"image": str(img), "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                 {"from": "gpt", "value": "Noise."}]}
    a2 = tmp_path / "ann.jsonl"
    a2.write_text("\n".join(json.dumps(x) for x in [e0, e_img]) + "\n")
    out = str(tmp_path / "wds")
    s = preprocess(str(a2), out, media_root=raw, fps=4, max_frames=100, image_size=SIZE,
                   image_format="png", progress=False, resize_mode="crop",
                   allow_outside_media_root=True)  # the image lies outside the media root
    assert s.written == 2, s.skipped
    samples = read_tar_samples(out)
    m0 = json.loads(samples["s00000000"]["json"])
    # 8 fps source, 4 fps sampling in [0.5, 1.25]: times 0.5, 0.75, 1.0, 1.25
    assert m0["frame_times"] == [0.5, 0.75, 1.0, 1.25]
    ref = pyav_all_frames(os.path.join(raw, entries[0]["video"]))
    for j, k in enumerate([4, 6, 8, 10]):
        got = np.asarray(Image.open(io.BytesIO(samples["s00000000"][f"{j:04d}.png"])))
        np.testing.assert_array_equal(got, ref_crop(ref[k], SIZE))
    m1 = json.loads(samples["s00000001"]["json"])
    assert m1["num_frames"] == 1 and m1["media"] == "image"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(samples["s00000001"]["0000.png"]))),
                                  ref_crop(arr, SIZE))


@pytest.fixture()
def bad_dir(tmp_path):
    """Good videos and images mixed with every kind of bad input, as one JSONL."""
    d = tmp_path / "bad"
    ann = make_synthetic_videos(str(d), num_videos=3, frames_per_video=10, width=32, height=32,
                                seed=1)
    good = json.load(open(ann))
    rng = np.random.default_rng(0)
    (d / "videos" / "corrupt.mp4").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (d / "videos" / "empty.mp4").write_bytes(b"")
    full = open(d / good[0]["video"], "rb").read()
    (d / "videos" / "truncated.mp4").write_bytes(full[: len(full) // 2])  # moov at the end: lost
    frames = (rng.random((12, 32, 32, 3)) * 255).astype(np.uint8)
    write_video(str(d / "videos" / "fs.mp4"), frames)
    with av.open(str(d / "videos" / "faststart.mp4"), "w", options={"movflags": "faststart"}) as o:
        st = o.add_stream("libx264", rate=8)
        st.width = st.height = 32
        st.pix_fmt = "yuv420p"
        for f in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                o.mux(p)
        for p in st.encode():
            o.mux(p)
    ff = open(d / "videos" / "faststart.mp4", "rb").read()
    (d / "videos" / "truncated_faststart.mp4").write_bytes(ff[: len(ff) * 2 // 3])  # moov kept
    for ext in (".webm", ".mkv"):  # the header (duration) survives, the data does not
        write_video(str(d / "videos" / f"long{ext}"), np.repeat(frames, 4, axis=0))
        full = open(d / "videos" / f"long{ext}", "rb").read()
        (d / "videos" / f"truncated{ext}").write_bytes(full[: len(full) // 2])
    (d / "videos" / "empty.jpg").write_bytes(b"")
    Image.fromarray(frames[0]).save(d / "videos" / "ok.jpg")

    def conv(q="<video>\nQ?"):
        return [{"from": "human", "value": q}, {"from": "gpt", "value": "A."}]
    lines = [json.dumps(good[0]),
             json.dumps({"video": "videos/corrupt.mp4", "conversations": conv()}),
             json.dumps({"video": "videos/empty.mp4", "conversations": conv()}),
             json.dumps({"video": "videos/missing.mp4", "conversations": conv()}),
             json.dumps(good[1]),
             '{"video": "videos/vid_0002.mp4", "conversations": [',  # malformed line
             json.dumps({"video": "videos/vid_0002.mp4"}),  # no conversations
             json.dumps({"video": "videos/truncated.mp4", "conversations": conv()}),
             json.dumps({"video": "videos/truncated_faststart.mp4", "conversations": conv()}),
             json.dumps({"image": "videos/empty.jpg", "conversations": conv("<image>\nQ?")}),
             json.dumps({"image": "videos/ok.jpg", "conversations": conv("<image>\nQ?")}),
             json.dumps(good[2]),
             json.dumps({"video": "videos/faststart.mp4", "conversations": conv()}),
             json.dumps({"video": "videos/truncated.webm", "conversations": conv()}),
             json.dumps({"video": "videos/long.webm", "conversations": conv()}),
             json.dumps({"video": "videos/truncated.mkv", "conversations": conv()}),
             json.dumps({"video": "videos/long.mkv", "conversations": conv()})]
    (d / "ann.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_bad_input_is_skipped_and_named(bad_dir, tmp_path):
    out = str(tmp_path / "wds")
    s = preprocess(str(bad_dir / "ann.jsonl"), out, num_frames=4, image_size=16, num_workers=2,
                   shard_max_samples=2, progress=False)
    samples = read_tar_samples(out)
    good = {0, 4, 10, 11, 12, 14, 16}
    assert sorted(samples) == [f"s{i:08d}" for i in sorted(good)]
    assert s.written == len(good)
    reasons = {name: why for name, why in s.skipped}
    assert len(reasons) == 17 - len(good)

    def reason(idx):
        hit = [why for name, why in reasons.items() if name.startswith(f"entry {idx} ") or name == f"entry {idx}"]
        assert len(hit) == 1, (idx, reasons)
        return hit[0]
    assert "corrupt.mp4" in reason(1) and "unreadable" in reason(1)
    assert "empty file" in reason(2) and "empty.mp4" in reason(2)
    assert "missing file" in reason(3) and "missing.mp4" in reason(3)
    assert "not valid JSON" in reason(5) and "line 6" in reason(5)
    assert "conversations" in reason(6)
    assert "truncated.mp4" in reason(7)
    assert "truncated" in reason(8) and "truncated_faststart.mp4" in reason(8)
    assert "empty file" in reason(9)
    assert "truncated" in reason(13) and "truncated.webm" in reason(13)
    assert "truncated" in reason(15) and "truncated.mkv" in reason(15)
    # the good ones are complete
    for k in good:
        assert len([f for f in samples[f"s{k:08d}"] if f.endswith(".jpg")]) == (1 if k == 10 else 4)
    meta = json.load(open(os.path.join(out, ".nv-meta", "longvila.json")))
    assert meta["summary"]["written"] == len(good) and len(meta["summary"]["skipped"]) == 10


def test_strict_stops_and_leaves_no_partial_shard(bad_dir, tmp_path):
    out = str(tmp_path / "wds")
    with pytest.raises(PreprocessError, match="corrupt.mp4"):
        preprocess(str(bad_dir / "ann.jsonl"), out, num_frames=2, image_size=16, strict=True,
                   progress=False)
    left = os.listdir(out)
    assert not [f for f in left if f.endswith(".tmp") or f.endswith(".tar")], left
    # refuses to mix with old shards unless asked
    preprocess(str(bad_dir / "ann.jsonl"), out, num_frames=2, image_size=16, progress=False)
    with pytest.raises(FileExistsError):
        preprocess(str(bad_dir / "ann.jsonl"), out, num_frames=2, image_size=16, progress=False)


def test_cli(bad_dir, tmp_path):
    out = str(tmp_path / "wds")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_videos.py"), "--annotations",
           str(bad_dir / "ann.jsonl"), "--out", out, "--num-frames", "2", "--image-size", "16",
           "--workers", "2", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "videos written: 7" in r.stdout and "skipped: 10" in r.stdout
    assert "missing.mp4" in r.stdout
    r = subprocess.run(cmd + ["--strict", "--overwrite"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "corrupt.mp4" in r.stderr


def test_energon_reads_the_shards(raw_videos, tmp_path):
    """Optional: when megatron-energon is installed, it loads our dataset as prepared."""
    energon = pytest.importorskip("megatron.energon")
    raw, ann = raw_videos
    out = str(tmp_path / "wds")
    preprocess(ann, out, num_frames=2, image_size=SIZE, shard_max_samples=4, progress=False)

    @energon.stateless
    def cook(sample):
        meta = sample["json"] if isinstance(sample["json"], dict) else json.loads(sample["json"])
        return {"key": sample["__key__"], "n": len(meta["conversations"])}

    class TE(energon.DefaultTaskEncoder):
        cookers = [energon.Cooker(cook)]

        def batch(self, samples):
            return samples

    ds = energon.get_train_dataset(out, batch_size=1, shuffle_buffer_size=None,
                                   max_samples_per_sequence=None, task_encoder=TE(), repeat=False,
                                   worker_config=energon.WorkerConfig(rank=0, world_size=1, num_workers=0))
    keys = sorted(s["key"] for b_ in energon.get_loader(ds) for s in b_)
    assert keys == [f"s{i:08d}" for i in range(6)]


@pytest.mark.parametrize("ext", [".mp4", ".webm"])
def test_keyframe_seeking_decodes_the_same_frames(tmp_path, ext):
    """A long-ish video with short GOPs (and B-frames for h264): sparse sampling seeks from
    keyframe to keyframe, and must give exactly the frames of a full sequential decode."""
    from megatron_longvila.data.video import decode_video
    rng = np.random.default_rng(2)
    frames = (rng.random((150, 32, 48, 3)) * 255).astype(np.uint8)
    frames[:, :8, :8] = np.arange(150)[:, None, None, None]  # every frame differs
    path = str(tmp_path / f"gop{ext}")
    codec = "libx264" if ext == ".mp4" else "libvpx-vp9"
    with av.open(path, "w") as o:
        st = o.add_stream(codec, rate=25)
        st.width, st.height, st.pix_fmt = 48, 32, "yuv420p"
        st.codec_context.gop_size = 10
        if codec == "libx264":
            st.options = {"bf": "3", "preset": "veryfast", "crf": "20"}
        for f in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                o.mux(p)
        for p in st.encode():
            o.mux(p)
    ref = pyav_all_frames(path)
    assert len(ref) == 150
    for n in (5, 7, 40):
        dec = decode_video(path, num_frames=n)
        idx = np.round(np.linspace(0, 149, n)).astype(int)
        assert dec.indices == idx.tolist()
        for got, k in zip(dec.frames, idx):
            np.testing.assert_array_equal(got, ref[k])
        assert not dec.extra["fallback"]
        if n == 5:
            assert dec.extra["seeks"] > 1 and dec.extra["decoded"] < 100, dec.extra
    dec = decode_video(path, num_frames=3, start=2.0, end=4.0)
    for got, k in zip(dec.frames, [50, 75, 100]):
        np.testing.assert_array_equal(got, ref[k])
