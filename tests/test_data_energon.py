"""megatron-energon metadatasets (MetadatasetV2 YAML, nested, weighted blend) as --data-path:
the same stream as the equivalent Megatron-weights blend of the same directories; a training
run on a metadataset resumes exactly; what the loader cannot honour is refused clearly."""

import json

import pytest
import torch

from megatron_longvila.data import build_train_loader, make_synthetic_dataset, preprocess

from trainutil import run_cli, train_records


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    root = tmp_path_factory.mktemp("energon")
    vids = make_synthetic_dataset(str(root / "v"), num_videos=12, num_frames=2, image_size=32,
                                  seed=2, shard_max_samples=4)
    entries = [{"conversations": [{"from": "human", "value": f"Say {i}."},
                                  {"from": "gpt", "value": f"{i}"}]} for i in range(30)]
    (root / "t.jsonl").write_text("\n".join(json.dumps(e) for e in entries))
    text = str(root / "text")
    preprocess(str(root / "t.jsonl"), text, key_prefix="t", shard_max_samples=10, progress=False)
    (root / "meta").mkdir()
    (root / "meta" / "sub.yaml").write_text(
        "__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n"
        "    path: ../text\n")
    (root / "meta" / "top.yaml").write_text(
        "__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n    blend:\n"
        f"      - weight: 7\n        path: {vids}\n"
        "      - weight: 3\n        path: sub.yaml\n")
    return root, vids, text, str(root / "meta" / "top.yaml")


KW = dict(seq_length=160, micro_batch_size=1, tokens_per_frame=4, image_size=32, num_workers=2,
          seed=9)


def test_metadataset_equals_weighted_blend(blend):
    root, vids, text, top = blend
    a = build_train_loader([top], "tiny", **KW)
    b = build_train_loader(["0.7", vids, "0.3", text], "tiny", **KW)
    assert [s.weight for s in a.specs] == pytest.approx([0.7, 0.3])
    seen = set()
    for _ in range(10):
        x, y = next(a), next(b)
        assert x["sample_keys"] == y["sample_keys"]
        for k in ("tokens", "labels", "cu_seqlens", "frames"):
            assert torch.equal(x[k], y[k]), k
        seen.update(k[0] for k in x["sample_keys"])
    assert seen == {"s", "t"}  # both datasets in the stream
    a.close(), b.close()


def test_metadataset_training_resumes_exactly(blend, tmp_path):
    root, vids, text, top = blend
    common = ["--data-path", top, "--seq-length", 160, "--micro-batch-size", 1,
              "--global-batch-size", 2, "--train-iters", 4, "--lr", 1e-3, "--seed", 4,
              "--num-workers", 2, "--save-interval", 2, "--log-sample-keys"]
    run_cli(common + ["--save", tmp_path / "ref", "--metrics-file", tmp_path / "ref.jsonl"])
    ref = train_records(tmp_path / "ref.jsonl")
    run_cli(common + ["--load", tmp_path / "ref", "--ckpt-step", 2, "--save", tmp_path / "again",
                      "--metrics-file", tmp_path / "again.jsonl"])
    again = train_records(tmp_path / "again.jsonl")
    assert [r["iteration"] for r in again] == [3, 4]
    for r, w in zip(again, ref[2:]):
        assert r["sample_keys"] == w["sample_keys"]
        assert r["loss"] == w["loss"]
    keys = [k for r in ref for k in r["sample_keys"]]
    assert {k[0] for k in keys} == {"s", "t"}


def test_metadataset_errors(blend, tmp_path):
    root, vids, text, top = blend
    bad = tmp_path / "bad.yaml"
    bad.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n"
                   f"    blend_epochized:\n      - repetitions: 2\n        path: {vids}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: splits.train: 'blend_epochized' is not supported"):
        build_train_loader([str(bad)], "tiny", **KW)
    bad.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  val:\n"
                   f"    path: {vids}\n")
    with pytest.raises(ValueError, match=r"no split 'train' \(splits: \['val'\]\)"):
        build_train_loader([str(bad)], "tiny", **KW)
    bad.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n"
                   "    path: nowhere\n")
    with pytest.raises(ValueError, match="dataset .*nowhere does not exist"):
        build_train_loader([str(bad)], "tiny", **KW)
