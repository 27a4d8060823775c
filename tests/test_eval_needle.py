"""V-NIAH: scoring, needle placement, resumable results, heatmap, and the CLI end to end on a
saved checkpoint: SP=2 (gloo) answers exactly like SP=1, and a rerun skips finished cells."""

import json
import os

import numpy as np
import pytest
import torch

from dist import run_distributed
from megatron_longvila.evaluation import needle as N


def test_score():
    assert N.score("Red.", "red") and N.score("  red ", "Red")
    assert not N.score("red square", "red")
    assert N.score("The square is red.", "red", "contains")
    assert not N.score("The square is reddish.", "red", "contains")
    assert not N.score("green", "red", "contains")


def test_insert_needle_depths():
    hay = [np.full((2, 2, 3), i, np.uint8) for i in range(7)]
    needle = np.full((2, 2, 3), 255, np.uint8)
    for depth, at in ((0.0, 0), (0.5, 4), (1.0, 7), (0.25, 2)):
        frames = N.insert_needle(hay, needle, depth)
        assert len(frames) == 8
        where = [i for i, f in enumerate(frames) if f[0, 0, 0] == 255]
        assert where == [at] == [N.needle_index(8, depth)]
        rest = [int(f[0, 0, 0]) for f in frames if f[0, 0, 0] != 255]
        assert rest == list(range(7))


def test_run_grid_resume_and_heatmap(tmp_path):
    needles = [N.Needle("a.png", "q?", "red"), N.Needle("b.png", "q?", "blue")]
    imgs = [np.full((4, 4, 3), 200, np.uint8), np.full((4, 4, 3), 100, np.uint8)]
    calls = []

    def answer_fn(frames, nd):
        calls.append((len(frames), nd.answer))
        pos = [i for i, f in enumerate(frames) if f[0, 0, 0] in (200, 100)][0]
        return nd.answer if pos < len(frames) - 1 else "green"  # wrong when last

    def hay(n):
        return [np.zeros((4, 4, 3), np.uint8)] * n

    path = str(tmp_path / "r.json")
    s = {"checkpoint": "x"}
    N.run_grid(answer_fn, hay, needles, imgs, [2, 4], [0.0, 1.0], N.Results(path, s))
    assert len(calls) == 8
    first = json.load(open(path))
    assert first["summary"] == {"cells": 4, "answers": 8, "correct": 4, "accuracy": 0.5}
    calls.clear()
    res = N.run_grid(answer_fn, hay, needles, imgs, [2, 4, 8], [0.0, 0.5, 1.0],
                     N.Results(path, s))
    # only the 5 new cells ran: (2,.5), (4,.5), (8,0), (8,.5), (8,1)
    assert sorted(set(calls)) == sorted({(n, a) for n in (2, 4, 8) for a in ("red", "blue")})
    assert len(calls) == 10
    data = res.to_dict()
    assert [(c["frames"], c["depth"]) for c in data["cells"]] == \
        [(n, d) for n in (2, 4, 8) for d in (0.0, 0.5, 1.0)]
    acc = {(c["frames"], c["depth"]): c["accuracy"] for c in data["cells"]}
    assert acc[(8, 1.0)] == 0.0 and acc[(8, 0.5)] == 1.0 and acc[(2, 0.5)] == 0.0
    with pytest.raises(ValueError, match="other settings"):
        N.Results(path, {"checkpoint": "y"})
    png = N.plot_heatmap(data, str(tmp_path / "r.png"))
    from PIL import Image
    with Image.open(png) as im:
        assert im.size[0] > 200 and im.size[1] > 150


def _save_worker(rank, world, path, seed):
    from megatron_longvila import cpu_compat
    from megatron_longvila.conversion.tp import full_state_dict, load_full_state_dict
    from megatron_longvila.models import LongVILAModel
    from megatron_longvila.models.config import get_preset
    from megatron_longvila.parallel.groups import initialize_mmsp
    from megatron_longvila.checkpoint import save_model_checkpoint
    initialize_mmsp()
    cpu_compat.model_parallel_seed(seed)
    model = LongVILAModel(get_preset("tiny"))
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in full_state_dict(model).items()}
    load_full_state_dict(model, sd)
    save_model_checkpoint(model, path)


def _eval_inproc(argv):
    """The CLI at SP=1 in this process (a one-rank gloo world): saves a process start."""
    from modelutil import init_single_process
    init_single_process()
    return _eval_worker(0, 1, argv)


def _eval_worker(rank, world, argv):
    import contextlib
    import io
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("eval_needle", os.path.join(root, "tools", "eval_needle.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        mod.main(argv)
    return buf.getvalue()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from megatron_longvila.evaluation.needle_data import make_needle_eval_set
    d = tmp_path_factory.mktemp("niah")
    run_distributed(_save_worker, 1, str(d / "ckpt"), 0)
    needles = make_needle_eval_set(str(d / "eval"), haystack_frames_count=12, needles_per_colour=1,
                                   colours=("red", "blue"))
    return d, str(d / "ckpt"), needles


def _argv(d, ckpt, needles, out, frames="3,6", depths="0,1"):
    return ["--load", ckpt, "--haystack", str(d / "eval" / "haystack.mp4"), "--needles", needles,
            "--frame-counts", frames, "--depths", depths, "--max-new-tokens", "4",
            "--output", str(d / out)]


@pytest.fixture(scope="module")
def sp1(ckpt):
    d, path, needles = ckpt
    log1 = _eval_inproc(_argv(d, path, needles, "sp1.json"))
    return log1, json.load(open(d / "sp1.json"))


def _outputs(results):
    return [(c["key"], [a["output"] for a in c["answers"]]) for c in results["cells"]]


def test_cli_sp2_answers_like_sp1_and_resumes(ckpt, sp1):
    d, path, needles = ckpt
    log1, r1 = sp1
    logs2 = run_distributed(_eval_worker, 2, _argv(d, path, needles, "sp2.json") +
                            ["--context-parallel-size", "2"])
    r2 = json.load(open(d / "sp2.json"))
    assert os.path.getsize(d / "sp1.png") > 0 and os.path.getsize(d / "sp2.png") > 0
    outs1 = [(c["key"], [a["output"] for a in c["answers"]]) for c in r1["cells"]]
    outs2 = [(c["key"], [a["output"] for a in c["answers"]]) for c in r2["cells"]]
    assert len(outs1) == 4 and all(len(o) == 2 for _, o in outs1)
    # the perturbed random model says different things for different inputs
    assert len({tuple(o) for _, o in outs1}) > 1 and any(x for _, o in outs1 for x in o)
    assert outs2 == outs1
    assert "accuracy" in log1 and "accuracy" in logs2[0] and logs2[1] == ""
    # resume: a wider grid runs only the new cells; the old ones are kept as they were
    import shutil
    shutil.copy(d / "sp1.json", d / "resume.json")
    log3 = _eval_inproc(_argv(d, path, needles, "resume.json", frames="3,6", depths="0,0.5,1"))
    assert log3.count("frames") == 2 and "depth  0.50" in log3
    r3 = json.load(open(d / "resume.json"))
    old = {c["key"]: c for c in r1["cells"]}
    assert len(r3["cells"]) == 6
    assert all(c == old[c["key"]] for c in r3["cells"] if c["key"] in old)


def test_hf_conversion_answers_like_megatron(ckpt, sp1):
    """Megatron -> HF: transformers (tools/eval_needle.py --hf) gives the same answers; and
    HF -> Megatron again: the Megatron model gives the same answers."""
    import subprocess
    import sys
    d, path, needles = ckpt
    _, r1 = sp1
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    py = [sys.executable]
    subprocess.run(py + [os.path.join(root, "tools", "convert_megatron_to_hf.py"), "--load", path,
                         "--save", str(d / "hf"), "--dtype", "fp32"], check=True,
                   capture_output=True)
    subprocess.run(py + [os.path.join(root, "tools", "convert_hf_to_megatron.py"), "--hf-path",
                         str(d / "hf"), "--save", str(d / "back"), "--dtype", "fp32"], check=True,
                   capture_output=True)
    hf_argv = _argv(d, path, needles, "hf.json")
    hf_argv[hf_argv.index("--load"):hf_argv.index("--load") + 2] = ["--hf", str(d / "hf")]
    _eval_inproc(hf_argv)
    _eval_inproc(_argv(d, str(d / "back"), needles, "back.json"))
    want = _outputs(r1)
    assert _outputs(json.load(open(d / "hf.json"))) == want
    assert _outputs(json.load(open(d / "back.json"))) == want


def test_needle_dataset_keeps_every_frame(tmp_path):
    """Training shards hold every frame of each needle video, the needle where it was drawn."""
    from megatron_longvila.data import build_train_loader
    from megatron_longvila.evaluation.needle_data import NEEDLE_COLOURS, make_needle_dataset
    wds = make_needle_dataset(str(tmp_path), num_videos=6, frames_per_video=(1, 6), seed=5)
    ann = {f"needle-{i}": e for i, e in
           enumerate(json.load(open(tmp_path / "raw" / "annotations.json")))}
    loader = build_train_loader(wds, "tiny", seq_length=512, tokens_per_frame=4, image_size=32,
                                num_workers=0, epochs=1, shuffle=False)
    seen = 0
    for b in loader:
        frames = b["frames"]
        start = 0
        for key, nf in zip(b["sample_keys"], b["frames_per_sample"].tolist()):
            if not key.startswith("s"):
                continue
            e = ann[f"needle-{int(key[1:])}"]
            assert nf == e["num_frames"]
            f = frames[start:start + nf]
            sat = (f.amax(1) - f.amin(1)).flatten(1).amax(1)  # colour saturation per frame
            assert int(sat.argmax()) == e["needle_index"] and sat.max() > 0.5
            assert e["conversations"][1]["value"] in NEEDLE_COLOURS
            start += nf
            seen += 1
    loader.close()
    assert seen == 6


def _generate_worker(rank, world, argv):
    import contextlib
    import io
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("generate", os.path.join(root, "tools", "generate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        mod.main(argv)
    return buf.getvalue()


def test_generate_cli_sp2_like_sp1(ckpt):
    """tools/generate.py on a saved checkpoint, a video and an image: greedy and sampled
    answers at SP=2 equal SP=1's (rank 0 prints, rank 1 stays quiet)."""
    d, path, needles = ckpt
    from modelutil import init_single_process
    init_single_process()
    base = ["--load", path, "--video", str(d / "eval" / "haystack.mp4"), "--num-frames", "5",
            "--image", str(d / "eval" / "needles" / "red_0.png"),
            "--prompt", "What colour is the square?", "--max-new-tokens", "6", "--json"]
    runs = [base, base + ["--do-sample", "--temperature", "1.5", "--sample-seed", "3"]]
    ref = [json.loads(_generate_worker(0, 1, a)) for a in runs]
    assert ref[0]["frames"] == 6 and ref[0]["token_ids"] and ref[0]["token_ids"] != ref[1]["token_ids"]
    for a, want in zip(runs, ref):
        out = run_distributed(_generate_worker, 2, a + ["--seq-parallel-size", "2"])
        assert out[1] == ""
        got = json.loads(out[0])
        assert got["ranks"] == 2
        assert (got["answer"], got["token_ids"]) == (want["answer"], want["token_ids"])
