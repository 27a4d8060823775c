"""LongVILAModel under MM-SP (gloo, CPU) == the single-process model on the same weights and
the same packed batch: logits of every token, the loss, and every parameter gradient."""

import pytest
import torch

from dist import run_distributed
from megatron_longvila import cpu_compat
from megatron_longvila.constants import IGNORE_INDEX
from megatron_longvila.models import LongVILAModel
from modelutil import full_mcore_state_from_hf, hf_modules, packed_batch, tiny_config


def _worker(rank, world, configs, full_sd, cfg_dict, batch):
    """Each config ``(tp, cp, ring, ring_type)`` in turn, in one set of processes."""
    return [_one(rank, world, *c, full_sd, cfg_dict, batch) for c in configs]


def _one(rank, world, tp, cp, ring, ring_type, full_sd, cfg_dict, batch):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron_longvila.conversion.tp import gather_full_tensor, load_full_state_dict
    from megatron_longvila.models.config import LongVILAConfig
    from megatron_longvila.parallel.groups import initialize_mmsp
    from megatron_longvila.evaluation.generation import prefill_logits
    from megatron_longvila.parallel.layout import SequenceLayout
    from megatron_longvila.parallel.sharding import gather_sequence, sp_loss

    cfg = LongVILAConfig.from_dict(cfg_dict)
    parallel_state.destroy_model_parallel()
    grp = initialize_mmsp(tp=tp, cp=cp, ring=ring, num_heads=cfg.llm.num_attention_heads,
                          num_kv_heads=cfg.llm.num_query_groups)
    cpu_compat.model_parallel_seed(0)
    model = LongVILAModel(cfg, seq_parallel_ring_type=ring_type)
    load_full_state_dict(model, full_sd)
    args = (batch["tokens"], batch["position_ids"], batch["frames"])
    # inference: long prefill with the same sharding, logits of the last token of each sample
    last = (batch["cu_seqlens"][1:] - 1).tolist()
    prefill = prefill_logits(model.eval(), *args, cu_seqlens=batch["cu_seqlens"],
                             positions=last)
    model.train()
    out = model(*args, cu_seqlens=batch["cu_seqlens"], parallel_output=False)
    lout = model(*args, batch["labels"], batch["cu_seqlens"])
    logits, losses = out.output, lout.output
    S = batch["tokens"].shape[1]
    if cp > 1:
        layout = SequenceLayout(batch["cu_seqlens"], ring, cp // ring, ring_type)
        assert logits.shape[1] == layout.local_len < S
        assert torch.equal(out.row_index, lout.row_index)
        logits = gather_sequence(logits[0].detach(), out.row_index[0], S, grp.sp_group)[None]
        loss, _, _ = sp_loss(losses[0], lout.loss_mask[0], grp.sp_group)
    else:
        valid = batch["labels"] != IGNORE_INDEX
        loss = losses.sum() / valid.sum()
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        g = gather_full_tensor(model, name, p, g.detach())
        if cp > 1:  # each SP rank holds its share of the gradient: the sum is the gradient
            dist.all_reduce(g, group=parallel_state.get_context_parallel_group())
        grads[name] = g
    return logits.detach(), loss.detach(), grads, prefill


REF = (1, 1, 1, "zigzag_ring_varlen")  # single process (or plain data parallel)
SP2 = {"sp2-ulysses": (1, 2, 1, "zigzag_ring_varlen"),
       "sp2-ring": (1, 2, 2, "ring_varlen"),
       "sp2-zigzag": (1, 2, 2, "zigzag_ring_varlen")}
SP4 = {"sp4-2ulyssesx2ring": (1, 4, 2, "zigzag_ring_varlen"),
       "tp2xsp2": (2, 2, 1, "zigzag_ring_varlen")}


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config("qwen2", "mlp_downsample", tied=False)
    lm, vt, proj = hf_modules(cfg)
    full = full_mcore_state_from_hf(cfg, lm, vt, proj)
    # uneven frames per sample, several sub-sequences, padding segment at the end
    batch = packed_batch(cfg, frames_per_sample=(3, 0, 2, 1), text_lens=(7, 11, 6, 5), pad=3)
    assert batch["frames"].shape[0] == 6 and len(batch["cu_seqlens"]) == 6
    # 2 processes: the single-process reference (TP=SP=1; the two ranks are plain data-parallel
    # replicas of it), then the SP=2 layouts; 4 processes: SP=4 and TP=2 x SP=2
    two = run_distributed(_worker, 2, [REF] + list(SP2.values()), full, cfg.to_dict(), batch)
    four = run_distributed(_worker, 4, list(SP4.values()), full, cfg.to_dict(), batch)
    ref = two[0][0]
    results = {name: [r[1 + i] for r in two] for i, name in enumerate(SP2)}
    results.update({name: [r[i] for r in four] for i, name in enumerate(SP4)})
    return batch, ref, results


@pytest.mark.parametrize("name", list(SP2) + list(SP4))
def test_mmsp_matches_single_process(setup, name):
    batch, ref, results = setup
    for logits, loss, grads, prefill in results[name]:
        assert logits.shape == ref[0].shape
        torch.testing.assert_close(prefill, ref[0][0, (batch["cu_seqlens"][1:] - 1).long()],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref[1], rtol=1e-6, atol=1e-6)
        assert grads.keys() == ref[2].keys() and len(grads) > 20
        for gname in ref[2]:
            torch.testing.assert_close(grads[gname], ref[2][gname], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=gname: f"{n}: {m}")
