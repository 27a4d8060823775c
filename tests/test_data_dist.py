"""The loader under Megatron's parallel state (2 gloo processes, CP/SP=2, so DP=1): with
dp_rank/dp_size taken from parallel_state, the two SP ranks get identical batches, all of the
epoch. (If the CP ranks were counted as data-parallel they would split it instead.) The DP
split itself is tested in-process in test_data_loader.py."""


from dist import run_distributed


def _worker(rank, world_size, path):
    import torch
    from megatron.core import parallel_state as ps
    from megatron_longvila.data import build_train_loader
    ps.initialize_model_parallel(tensor_model_parallel_size=1, context_parallel_size=2)
    loader = build_train_loader(path, "tiny", seq_length=300, tokens_per_frame=4, image_size=32,
                                dp_rank=None, dp_size=None, num_workers=0, epochs=1, seed=5)
    batches = list(loader)
    return {"dp": (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
            "cp": ps.get_context_parallel_rank(),
            "keys": [k for b in batches for k in b["sample_keys"]],
            "tokens": torch.cat([b["tokens"] for b in batches], 1).tolist(),
            "frames_sum": float(sum(b["frames"].double().sum() for b in batches))}


def test_loader_under_parallel_state(tmp_path):
    from megatron_longvila.data import make_synthetic_dataset
    path = make_synthetic_dataset(str(tmp_path), num_videos=12, num_frames=3, image_size=32)
    out = run_distributed(_worker, 2, path)
    assert [r["dp"] for r in out] == [(0, 1), (0, 1)]
    assert sorted(r["cp"] for r in out) == [0, 1]
    a, b = out
    assert a["keys"] == b["keys"] and a["tokens"] == b["tokens"]
    assert a["frames_sum"] == b["frames_sum"]
    assert sorted(a["keys"]) == [f"s{i:08d}" for i in range(12)]
