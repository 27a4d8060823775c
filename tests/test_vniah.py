"""V-NIAH as LongVILA scores it: needle sets in LongVA's and the Hugging Face (parquet) form,
haystack embeddings computed once per frame count (== the frames path), teacher-forced scores
(== greedy generation's prefix) from the same prefill as free generation."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_longvila.evaluation import needle as N
from modelutil import init_single_process


def _png(path, colour):
    Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(path)


def test_load_needles_longva_and_parquet(tmp_path):
    (tmp_path / "images").mkdir()
    _png(tmp_path / "images" / "a.png", 200)
    data = [{"path": "a.png", "prompt": "\nFind the frame. What colour?\nAnswer briefly.",
             "answer": "Red"}]
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    (nd,) = N.load_needles(str(tmp_path / "dataset.json"))
    assert nd.image == str(tmp_path / "images" / "a.png") and nd.frame is None
    assert nd.question == "Find the frame. What colour?\nAnswer briefly." and nd.answer == "Red"
    (tmp_path / "bad.json").write_text(json.dumps([{"path": "a.png", "prompt": "q"}]))
    with pytest.raises(ValueError, match="needle 0 lacks answer"):
        N.load_needles(str(tmp_path / "bad.json"))

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)).save(buf, "PNG")
    table = pa.table({"image": [{"bytes": buf.getvalue(), "path": "n.png"}],
                      "question": ["What is it?"], "answer": ["200"]})
    pq.write_table(table, tmp_path / "test.parquet")
    (nd,) = N.load_needles(str(tmp_path / "test.parquet"))
    assert (nd.image, nd.question, nd.answer) == ("n.png", "What is it?", "200")
    assert np.array_equal(nd.frame, np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))


def _tiny_model():
    from megatron_longvila import cpu_compat
    from megatron_longvila.conversion.tp import full_state_dict, load_full_state_dict
    from megatron_longvila.models import LongVILAModel, get_preset
    cpu_compat.model_parallel_seed(0)
    model = LongVILAModel(get_preset("tiny"))
    g = torch.Generator().manual_seed(0)
    load_full_state_dict(model, {k: v + 0.5 * torch.randn(v.shape, generator=g)
                                 if v.is_floating_point() else v
                                 for k, v in full_state_dict(model).items()})
    return model.eval()


def test_embedding_cache_and_teacher_forced_scores():
    from megatron_longvila.data.tokenizer import build_tokenizer
    from megatron_longvila.evaluation import generation as G
    from megatron_longvila.evaluation.vniah import NeedleEvaluator
    init_single_process()
    model, tok = _tiny_model(), build_tokenizer("tiny")
    size = model.cfg.vision.image_size
    rng = np.random.default_rng(0)
    needle_frames = [rng.integers(0, 255, (2 * size, 2 * size, 3), dtype=np.uint8)
                     for _ in range(2)]
    needles = [N.Needle("a.png", "What colour is the square?", "red"),
               N.Needle("b.png", "Which shape?", "a blue square")]
    cfg = G.GenerationConfig(max_new_tokens=6, stop_ids=G.stop_token_ids(tok))
    ev = NeedleEvaluator(model, tok, size, cfg, "both", needles, needle_frames)
    ref = NeedleEvaluator(model, tok, size, cfg, "both", needles, needle_frames)
    ref.embed = False  # frames through the model's own forward, recompute path
    assert ev.embed
    calls = []
    real_encode = ev._encode
    ev._encode = lambda frames: calls.append(len(frames)) or real_encode(frames)
    outputs = set()
    for n in (3, 5):
        hay = [rng.integers(0, 255, (2 * size, 2 * size, 3), dtype=np.uint8)
               for _ in range(n - 1)]
        ev.set_haystack(n, hay)
        ref.set_haystack(n, hay)
        for depth in (0.0, 0.5, 1.0):
            for i in range(2):
                got, want = ev.cell(n, depth, i), ref.cell(n, depth, i)
                assert got == want
                outputs.add(got["output"])
    # the haystack once per frame count, each needle once
    assert calls == [2, 1, 1, 4]
    assert len(outputs) > 1
    # teacher-forced == "greedy generation starts with the answer's tokens", on the
    # embedding path: the answer taken from the model's own greedy tokens, then one changed
    ids = G.build_prompt_ids(tok, needles[0].question, 5)
    prompt = G.expand_image_tokens(ids, model.tokens_per_frame)
    vis = torch.cat([ev._hay_emb[:2], ev._needle(0), ev._hay_emb[2:]]).flatten(0, 1)
    gen, _ = G.generate_batch(model, [prompt], None, G.GenerationConfig(max_new_tokens=4),
                              visual_embeddings=vis)
    ans = gen[0][:3]
    bad = ans[:2] + [(ans[2] + 1) % model.cfg.llm.vocab_size]
    ok, _ = G.teacher_forced(model, [prompt, prompt], [ans, bad], visual_embeddings=torch.cat([vis, vis]))
    assert ok == [True, False]
