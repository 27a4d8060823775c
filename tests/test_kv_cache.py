"""Generation with the KV cache: greedy outputs equal the recompute-everything path (video,
image and text prompts, several lengths, several prompts per call), decode-step logits equal a
full forward's, teacher-forced scoring equals the one-forward scoring, and SP-sharded decoding
(SP=2 x ring 2 and SP=2 Ulysses, gloo) equals SP=1 decoding with the cache staying sharded."""

import pytest
import torch

from dist import run_distributed
from megatron_longvila.constants import IMAGE_TOKEN_INDEX
from modelutil import init_single_process

MAX_NEW = 10


def _model(seed=0):
    """The tiny model with perturbed weights (varied greedy outputs, not one repeated token)."""
    from megatron_longvila import cpu_compat
    from megatron_longvila.conversion.tp import full_state_dict, load_full_state_dict
    from megatron_longvila.models import LongVILAModel, get_preset
    cfg = get_preset("tiny")
    cpu_compat.model_parallel_seed(seed)
    model = LongVILAModel(cfg)
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.5 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in full_state_dict(model).items()}
    load_full_state_dict(model, sd)
    return model.eval()


def _inputs(cfg):
    """A video prompt (3 frames), an image prompt (1 frame), a text prompt."""
    g = torch.Generator().manual_seed(7)
    T, S = cfg.tokens_per_frame, cfg.vision.image_size

    def prompt(nf, nt):
        ids = torch.randint(0, cfg.llm.vocab_size, (nt,), generator=g)
        return torch.cat([ids[:3], torch.full((nf * T,), IMAGE_TOKEN_INDEX), ids[3:]])[None]
    prompts = [prompt(3, 9), prompt(1, 6), prompt(0, 11)]
    frames = [torch.randn(3, 3, S, S, generator=g), torch.randn(1, 3, S, S, generator=g), None]
    return prompts, frames


def _step_logits(model, prompts, frames, feed):
    """Prefill + decode steps feeding ``feed[i]`` (token lists) -> per prompt the logits
    ``[len(feed[i]) + 1, V]`` (prefill's last row, then one per step), and the cache."""
    from megatron_longvila.evaluation.generation import pack_prompts, sp_group
    from megatron_longvila.parallel.sharding import select_rows
    tokens, pos, cu = pack_prompts(prompts)
    last = (cu[1:] - 1).long()
    have = [f for f in frames if f is not None]
    out, cache = model.prefill(tokens, pos, cu, frames=torch.cat(have), max_new_tokens=MAX_NEW,
                               output_rows=last)
    logits = [[row] for row in select_rows(out.output[0], out.row_index[0], last, sp_group())]
    for step in range(max(len(f) for f in feed)):
        live = [p for p in range(len(prompts)) if len(feed[p]) > step]
        toks = torch.tensor([[feed[p][step] for p in live]])
        ps = torch.tensor([[prompts[p].shape[1] + step for p in live]])
        lg = model.decode_step(toks, ps, cache, live)
        for j, p in enumerate(live):
            logits[p].append(lg[j])
    return [torch.stack(x).float() for x in logits], cache


@pytest.fixture(scope="module")
def ref():
    """SP=1 in this process: cached and recompute outputs, step logits."""
    from megatron_longvila.evaluation.generation import GenerationConfig, generate_batch
    init_single_process()
    model = _model()
    prompts, frames = _inputs(model.cfg)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW)
    cached, stats = generate_batch(model, prompts, frames, cfg, use_cache=True)
    recompute, _ = generate_batch(model, prompts, frames, cfg, use_cache=False)
    steps, _ = _step_logits(model, prompts, frames, [o[:-1] for o in recompute])
    return dict(model=model, prompts=prompts, frames=frames, cached=cached, stats=stats,
                recompute=recompute, steps=steps)


def test_cached_greedy_equals_recompute(ref):
    from megatron_longvila.evaluation.generation import GenerationConfig, generate_batch
    model, prompts, frames = ref["model"], ref["prompts"], ref["frames"]
    rec = ref["recompute"]
    assert all(len(o) == MAX_NEW for o in rec) and len({tuple(o) for o in rec}) == 3
    assert all(len(set(o)) > 1 for o in rec), rec  # varied outputs: the test can fail
    assert ref["cached"] == rec
    # several lengths, each prompt alone (video, image, text) and all together
    for n in (1, 4):
        cfg = GenerationConfig(max_new_tokens=n)
        alone = [generate_batch(model, [p], [f], cfg, use_cache=True)[0][0]
                 for p, f in zip(prompts, frames)]
        assert alone == [o[:n] for o in rec]
        assert generate_batch(model, prompts, frames, cfg)[0] == [o[:n] for o in rec]
    # a stop token ends one prompt early; the others go on
    stop = rec[1][2]
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, stop_ids=[stop])
    want = [o[:o.index(stop)] if stop in o else o for o in rec]
    assert generate_batch(model, prompts, frames, cfg)[0] == want
    s = ref["stats"]
    assert s.prompts == 3 and s.prompt_tokens == sum(p.shape[1] for p in prompts)
    assert s.decode_tokens == 3 * (MAX_NEW - 1) and s.generated_tokens == 3 * MAX_NEW
    assert s.prefill_tokens_per_s > 0 and s.decode_tokens_per_s > 0 and s.cache_bytes > 0


def test_decode_logits_equal_full_forward(ref):
    """Each decode step's logits == the logits of one forward over prompt + generated tokens."""
    from megatron_longvila.evaluation.generation import prefill_logits
    model, prompts, frames = ref["model"], ref["prompts"], ref["frames"]
    for p, (prompt, fr, out) in enumerate(zip(prompts, frames, ref["recompute"])):
        full = torch.cat([prompt, torch.tensor([out[:-1]])], dim=1)
        P = prompt.shape[1]
        want = prefill_logits(model, full, torch.arange(full.shape[1])[None], fr,
                              positions=list(range(P - 1, full.shape[1])))
        torch.testing.assert_close(ref["steps"][p], want.float(), rtol=1e-4, atol=1e-4)


def test_teacher_forced_scoring(ref):
    from megatron_longvila.evaluation.generation import (GenerationConfig, generate_and_score,
                                                         teacher_forced)
    model, prompts, frames, rec = ref["model"], ref["prompts"], ref["frames"], ref["recompute"]
    right = [o[:4] for o in rec]
    wrong = [list(a) for a in right]
    wrong[1][2] = (wrong[1][2] + 1) % model.cfg.llm.vocab_size
    for answers, want in ((right, [True] * 3), (wrong, [True, False, True])):
        cached, preds = teacher_forced(model, prompts, answers, frames, use_cache=True)
        one, preds1 = teacher_forced(model, prompts, answers, frames, use_cache=False)
        assert cached == one == want and preds == preds1
        # the predictions follow the model's greedy output up to the first forced change
        assert [p[:3] for p in preds] == [r[:3] for r in right]
        assert preds[0] == right[0] and preds[2] == right[2]
    # free generation and teacher-forced from one prefill (cache rewound in between)
    outs, correct, _ = generate_and_score(model, prompts, wrong,
                                          GenerationConfig(max_new_tokens=MAX_NEW), frames)
    assert outs == rec and correct == [True, False, True]


def _sp_worker(rank, world, configs, recompute):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron_longvila.evaluation.generation import GenerationConfig, generate_batch
    from megatron_longvila.parallel.groups import initialize_mmsp
    results = []
    for cp, ring, ring_type in configs:
        parallel_state.destroy_model_parallel()
        initialize_mmsp(tp=1, cp=cp, ring=ring, num_heads=4, num_kv_heads=2)
        model = _model()
        model.seq_parallel_ring_type = ring_type
        prompts, frames = _inputs(model.cfg)
        outs, _ = generate_batch(model, prompts, frames, GenerationConfig(max_new_tokens=MAX_NEW))
        steps, cache = _step_logits(model, prompts, frames, [o[:-1] for o in recompute])
        keys = torch.tensor(cache.lengths)  # this rank's keys per prompt (first layer's count)
        total = keys.clone()
        dist.all_reduce(total)
        results.append((outs, steps, keys, total))
    return results


def test_sp_sharded_decoding_equals_sp1(ref):
    configs = [(2, 2, "zigzag_ring_varlen"), (2, 1, "zigzag_ring_varlen")]
    outs = run_distributed(_sp_worker, 2, configs, ref["recompute"])
    lens = torch.tensor([p.shape[1] for p in ref["prompts"]])
    for rank_results in outs:
        for (gen, steps, keys, total) in rank_results:
            assert gen == ref["recompute"]
            for p in range(3):
                torch.testing.assert_close(steps[p], ref["steps"][p], rtol=1e-4, atol=1e-4)
            # the cache stays sharded: every prompt token and fed token is kept exactly once,
            # and no rank holds a whole prompt's keys
            assert torch.equal(total, lens + (MAX_NEW - 1))
            assert bool((keys < total).all())
