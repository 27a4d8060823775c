"""Generation: prompts equal training tokens; MM-SP (SP=2, gloo) decodes exactly like SP=1 on
the same weights (greedy and sampled), and its last-token logits equal the SP=1 forward's."""

import pytest
import torch

from dist import run_distributed
from megatron_longvila.constants import IMAGE_TOKEN_INDEX


def test_prompt_ids_are_the_training_prefix():
    from megatron_longvila.data.packing import expand_sample
    from megatron_longvila.data.task_encoder import EncodedSample, TaskEncoder
    from megatron_longvila.data.tokenizer import build_tokenizer
    from megatron_longvila.evaluation.generation import (build_prompt_ids, expand_image_tokens,
                                                         stop_token_ids)
    tok = build_tokenizer("tiny")
    q, a = "<video>\nWhat colour is the square?", "red"
    ids, tgt = TaskEncoder(tok).encode_conversation(
        [{"from": "human", "value": q}, {"from": "gpt", "value": a}], 3)
    prompt = build_prompt_ids(tok, q, 3)
    first_target = tgt.index(True)
    assert prompt == ids[:first_target]
    assert ids[first_target:first_target + 3] == tok.encode_text("red")
    assert ids[first_target + 3] in stop_token_ids(tok)
    # without a marker the frames go in front of the question, as in training
    assert build_prompt_ids(tok, "What colour is the square?", 3) == prompt
    assert prompt.count(IMAGE_TOKEN_INDEX) == 3
    toks, _ = expand_sample(EncodedSample("k", ids, tgt, [b""] * 3, []), 4)
    assert expand_image_tokens(prompt, 4)[0].tolist() == toks[:len(prompt) + 9].tolist()


def test_prepare_frames_matches_the_loader(tmp_path):
    """Frames prepared for generation == frames the training loader gives for the same video."""
    from megatron_longvila.data import build_train_loader
    from megatron_longvila.data.preprocess import preprocess
    from megatron_longvila.evaluation.generation import load_media
    from megatron_longvila.evaluation.needle_data import make_needle_videos
    ann = make_needle_videos(str(tmp_path / "raw"), num_videos=1, frames_per_video=5, seed=3)
    preprocess(ann, str(tmp_path / "wds"), fps=8.0, image_size=32, progress=False)
    loader = build_train_loader(str(tmp_path / "wds"), "tiny", seq_length=256, tokens_per_frame=4,
                                image_size=32, num_workers=0, epochs=1, shuffle=False)
    batch = next(iter(loader))
    loader.close()
    ours = load_media([str(tmp_path / "raw" / "videos" / "needle_00000.mp4")], 5, 32)
    assert batch["frames"].shape == ours.shape == (5, 3, 32, 32)
    torch.testing.assert_close(ours, batch["frames"], rtol=0, atol=0)


def _perturbed_state(seed=0):
    """Weights of the tiny preset made far from init so greedy outputs vary per step."""
    from megatron_longvila.conversion.tp import full_state_dict
    from megatron_longvila.models import LongVILAModel
    from megatron_longvila.models.config import get_preset
    from megatron_longvila import cpu_compat
    from modelutil import init_single_process
    init_single_process()
    cpu_compat.model_parallel_seed(seed)
    model = LongVILAModel(get_preset("tiny"))
    g = torch.Generator().manual_seed(seed)
    sd = full_state_dict(model)
    return {k: (v + 0.3 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
            for k, v in sd.items()}


def _gen_worker(rank, world, cp, ring, ring_type, full_sd, tokens, frames, cfgs):
    from megatron_longvila import cpu_compat
    from megatron_longvila.conversion.tp import load_full_state_dict
    from megatron_longvila.evaluation.generation import generate, last_token_logits
    from megatron_longvila.models import LongVILAModel
    from megatron_longvila.models.config import get_preset
    from megatron_longvila.parallel.groups import initialize_mmsp
    from megatron.core import parallel_state
    cfg = get_preset("tiny")
    if not parallel_state.model_parallel_is_initialized():  # in-process SP=1 reference: set
        initialize_mmsp(tp=1, cp=cp, ring=ring, num_heads=cfg.llm.num_attention_heads,
                        num_kv_heads=cfg.llm.num_query_groups)
    assert parallel_state.get_context_parallel_world_size() == cp
    cpu_compat.model_parallel_seed(0)
    model = LongVILAModel(cfg, seq_parallel_ring_type=ring_type)
    load_full_state_dict(model, full_sd)
    model.eval()
    logits = last_token_logits(model, tokens, frames)
    return logits, [generate(model, tokens, frames, c) for c in cfgs]


@pytest.fixture(scope="module")
def setup():
    from megatron_longvila.data.tokenizer import build_tokenizer
    from megatron_longvila.evaluation.generation import (GenerationConfig, build_prompt_ids,
                                                         expand_image_tokens, stop_token_ids)
    full = _perturbed_state()
    tok = build_tokenizer("tiny")
    n_frames = 5  # odd: frames split unevenly; prompt length odd: SP padding
    tokens = expand_image_tokens(build_prompt_ids(tok, "What colour is the square??", n_frames), 4)
    assert tokens.shape[1] % 2 == 1
    frames = torch.randn(n_frames, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfgs = [GenerationConfig(max_new_tokens=10, stop_ids=stop_token_ids(tok)),
            GenerationConfig(max_new_tokens=10, do_sample=True, temperature=1.0, top_k=50,
                             top_p=0.9, seed=7, stop_ids=stop_token_ids(tok))]
    ref = _gen_worker(0, 1, 1, 1, "zigzag_ring_varlen", full, tokens, frames, cfgs)  # in-process
    return full, tokens, frames, cfgs, ref


def test_reference_is_not_degenerate(setup):
    """The SP=1 reference decodes several distinct tokens (otherwise the SP test proves little)."""
    _, _, _, _, (logits, outs) = setup
    greedy, sampled = outs
    assert len(greedy) == 10 and len(set(greedy)) >= 3, greedy
    assert len(sampled) == 10 and sampled != greedy, sampled


@pytest.mark.parametrize("ring,ring_type", [(1, "zigzag_ring_varlen"), (2, "zigzag_ring_varlen")],
                         ids=["sp2-ulysses", "sp2-zigzag-ring"])
def test_sp2_generates_like_sp1(setup, ring, ring_type):
    full, tokens, frames, cfgs, (ref_logits, ref_outs) = setup
    outs = run_distributed(_gen_worker, 2, 2, ring, ring_type, full, tokens, frames, cfgs)
    for logits, gens in outs:
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert gens == ref_outs
