"""The trainer's embedded synthetic data: the same videos whatever the number of processes
drawing them, sized to the run, made once and reused (cache), with a progress bar."""

import json
import os

import numpy as np
import pytest

from megatron_longvila.data import synthetic


def _reference_frames(scene, n, width, height):
    # the plain full-image formulation: float gradient, square, disc mask over every pixel
    ys, xs = np.mgrid[0:height, 0:width]
    side = max(4, min(width, height) // 4)
    radius = max(3, min(width, height) // 6)
    out = []
    for t in range(n):
        a = t / max(n - 1, 1)
        img = np.stack([scene["bg"][c] + 60.0 * xs / max(width - 1, 1) +
                        30.0 * ys / max(height - 1, 1) for c in range(3)], -1)
        x0 = int((a if scene["rightwards"] else 1 - a) * (width - side))
        y0 = (height - side) // 3
        img[y0:y0 + side, x0:x0 + side] = synthetic.COLOURS[scene["square"]]
        cy = int(radius + a * (height - 2 * radius - 1))
        img[(xs - width * 2 // 3) ** 2 + (ys - cy) ** 2 <= radius ** 2] = \
            synthetic.COLOURS[scene["disc"]]
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize("size", [(64, 48), (37, 29)])
def test_render_matches_full_image_reference(size):
    rng = np.random.default_rng(3)
    for _ in range(3):
        scene = synthetic.draw_scene(rng)
        got = synthetic.render_scene(scene, 9, *size)
        assert np.array_equal(got, _reference_frames(scene, 9, *size))


def _decode(path):
    import av
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_parallel_drawing_gives_the_same_videos(tmp_path, capfd):
    a = synthetic.make_synthetic_videos(str(tmp_path / "a"), num_videos=4, frames_per_video=6,
                                        seed=11, num_workers=1)
    b = synthetic.make_synthetic_videos(str(tmp_path / "b"), num_videos=4, frames_per_video=6,
                                        seed=11, num_workers=2, progress=True)
    assert "synthetic videos" in capfd.readouterr().err  # the progress bar
    ea, eb = json.load(open(a)), json.load(open(b))
    assert ea == eb
    for e in ea:
        fa = _decode(os.path.join(tmp_path / "a", e["video"]))
        fb = _decode(os.path.join(tmp_path / "b", e["video"]))
        assert fa.shape == fb.shape and np.array_equal(fa, fb)


def test_samples_sized_to_the_run():
    assert synthetic.samples_for_run(64, train_iters=2, global_batch_size=1, parts=2) == 2
    assert synthetic.samples_for_run(64, train_iters=3, global_batch_size=4, parts=2) == 12
    assert synthetic.samples_for_run(64, train_iters=1000, global_batch_size=32, parts=8) == 64
    assert synthetic.samples_for_run(4, train_iters=1, global_batch_size=1, parts=8) == 8


def test_dataset_made_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGVILA_SYNTHETIC_CACHE", str(tmp_path / "cache"))
    kw = dict(num_videos=3, num_frames=2, image_size=32, seed=4, num_workers=2, progress=False)
    d1, reused1 = synthetic.cached_synthetic_dataset(None, **kw)
    assert not reused1 and os.path.isdir(d1)
    shards = sorted(os.listdir(d1))
    assert any(s.endswith(".tar") for s in shards)
    made = {s: os.path.getmtime(os.path.join(d1, s)) for s in shards}
    d2, reused2 = synthetic.cached_synthetic_dataset(None, **kw)
    assert reused2 and d2 == d1
    assert {s: os.path.getmtime(os.path.join(d1, s)) for s in shards} == made
    # other settings: another dataset; no temporary leftovers
    d3, reused3 = synthetic.cached_synthetic_dataset(None, **dict(kw, seed=5))
    assert not reused3 and d3 != d1
    assert not [e for e in os.listdir(tmp_path / "cache") if ".tmp-" in e]


def test_foreign_directory_is_not_overwritten(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not overwriting"):
        synthetic.cached_synthetic_dataset(str(d), num_videos=2, num_frames=2, image_size=32,
                                           seed=0, progress=False)
    assert (d / "notes.txt").read_text() == "keep me"
