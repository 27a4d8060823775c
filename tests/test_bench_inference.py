"""tools/benchmarks/bench_inference.py --tiny: the CPU smoke of the long-video inference
benchmark (KV cache vs recompute) runs, agrees with itself and writes its table."""

import importlib.util
import json
import os

from modelutil import init_single_process


def _load():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "bench_inference", os.path.join(root, "tools", "benchmarks", "bench_inference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_inference_tiny(tmp_path):
    init_single_process()
    mod = _load()
    out = tmp_path / "inf"
    r = mod.run(mod.build_parser().parse_args(["--tiny", "--out", str(out)]))
    from megatron_longvila.models import get_preset
    T = get_preset("tiny").tokens_per_frame
    assert r["prompt_tokens"] == 16 * T + 24
    cache, re = r["rows"]
    assert cache["path"] == "cache" and re["path"] == "recompute"
    assert cache["new_tokens"] == 4 and cache["decode_steps"] == 3
    assert re["new_tokens"] == 2 and re["decode_steps"] == 1
    assert cache["kv_cache_mib"] > 0 and re["kv_cache_mib"] == 0
    assert cache["decode_tokens_per_s"] > 0 and re["decode_tokens_per_s"] > 0
    assert r["recompute_equals_cache_prefix"] and r["cached_tokens"][:2] == r["recomputed_tokens"]
    saved = json.loads((out / "inference.json").read_text())
    assert saved["rows"] == r["rows"]
    table = (out / "inference.md").read_text()
    assert "| cache |" in table and "| recompute |" in table and "speed-up" in table
