"""The LongVILA model on the CPU: forward/backward, freezing, projector, HF parity, TP=2."""

import pytest
import torch

from megatron_longvila import cpu_compat
from megatron_longvila.constants import IGNORE_INDEX
from megatron_longvila.conversion.tp import load_full_state_dict
from megatron_longvila.models import LongVILAModel, get_preset
from megatron_longvila.models.projector import merge_2x2

from dist import run_distributed
from modelutil import (full_mcore_state_from_hf, hf_modules, hf_reference_logits,
                       init_single_process, packed_batch, tiny_config)


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_single_process()


def _model(cfg, seed=0):
    cpu_compat.model_parallel_seed(seed)
    return LongVILAModel(cfg)


def test_tiny_forward_backward_and_freezing():
    cfg = get_preset("tiny")
    model = _model(cfg)
    batch = packed_batch(cfg, frames_per_sample=(2, 1), text_lens=(6, 9), pad=2)
    model.set_trainable(vision=False, projector=True, llm=False)
    out = model(batch["tokens"], batch["position_ids"], batch["frames"], batch["labels"],
                batch["cu_seqlens"])
    losses = out.output
    valid = batch["labels"] != IGNORE_INDEX
    # SP=1 is the trivial layout: every row, in input order, masked where there is no label
    assert torch.equal(out.loss_mask, valid)
    assert torch.equal(out.row_index[0], torch.arange(batch["tokens"].shape[1]))
    assert losses.shape == batch["tokens"].shape
    assert torch.all(losses[~valid] == 0) and torch.all(losses[valid] > 0)
    # The loss path computes logits only on labelled rows: it must equal the cross entropy of
    # the full logits.
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], batch["frames"],
                       cu_seqlens=batch["cu_seqlens"], parallel_output=False).output
        want = torch.nn.functional.cross_entropy(logits[valid].double(),
                                                 batch["labels"][valid])
    torch.testing.assert_close(losses[valid].double().mean(), want, rtol=1e-5, atol=1e-6)
    (losses.sum() / valid.sum()).backward()
    for name, p in model.named_parameters():
        if name.startswith("projector."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    # The unused ViT tail never trains, even when the tower is trainable.
    model.set_trainable(True, True, True)
    assert not any(p.requires_grad for p in model.vision_model.post_layernorm.parameters())
    assert not any(p.requires_grad for p in model.vision_model.layers[-1].parameters())
    assert model.vision_model.layers[0].self_attention.linear_qkv.weight.requires_grad


def test_placeholder_count_mismatch_is_an_error():
    cfg = get_preset("tiny")
    model = _model(cfg)
    batch = packed_batch(cfg, frames_per_sample=(2,), text_lens=(6,), pad=0)
    with pytest.raises(ValueError, match="visual placeholder"):
        model(batch["tokens"], batch["position_ids"], batch["frames"][:1])


@pytest.mark.parametrize("order", ["column_major", "row_major"])
def test_merge_2x2_matches_index_definition(order):
    fixed = order == "row_major"
    g, c = 5, 3  # odd grid: zero-padded to 6x6 -> 9 tokens
    x = torch.randn(2, g * g, c)
    out = merge_2x2(x, order)
    grid = torch.zeros(2, g + 1, g + 1, c)
    grid[:, :g, :g] = x.reshape(2, g, g, c)
    half = (g + 1) // 2
    for i in range(half):      # row pair
        for j in range(half):  # column pair
            want = torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1],
                              grid[:, 2 * i + 1, 2 * j], grid[:, 2 * i + 1, 2 * j + 1]], -1)
            k = i * half + j if fixed else j * half + i
            torch.testing.assert_close(out[:, k], want, rtol=0, atol=0)


@pytest.mark.parametrize("family,projector,tied", [
    ("qwen2", "mlp_downsample", True),
    ("llama", "mlp_downsample_2x2_fix", False),
    ("qwen2", "mlp2x_gelu", False),
    ("llama", "linear", True),
])
def test_hf_parity(family, projector, tied):
    cfg = tiny_config(family, projector, tied=tied)
    lm, vt, proj = hf_modules(cfg)
    model = _model(cfg, seed=3).eval()
    load_full_state_dict(model, full_mcore_state_from_hf(cfg, lm, vt, proj))
    batch = packed_batch(cfg)
    want = hf_reference_logits(cfg, lm, vt, proj, batch)
    with torch.no_grad():
        got = model(batch["tokens"], batch["position_ids"], batch["frames"],
                    cu_seqlens=batch["cu_seqlens"], parallel_output=False).output
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"max abs logit error {err}"


def test_vision_tower_matches_siglip_hidden_states():
    cfg = tiny_config(select=-2)
    lm, vt, proj = hf_modules(cfg)
    model = _model(cfg).eval()
    load_full_state_dict(model, full_mcore_state_from_hf(cfg, lm, vt, proj))
    frames = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        want = vt(pixel_values=frames, output_hidden_states=True).hidden_states[-2]
        got = model.vision_model(frames)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- TP = 2
def _tp_worker(rank, world, tp, full_sd, cfg_dict, batch):
    from megatron.core import parallel_state
    from megatron_longvila.conversion.tp import full_state_dict
    from megatron_longvila.models.config import LongVILAConfig
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    cfg = LongVILAConfig.from_dict(cfg_dict)
    cpu_compat.model_parallel_seed(0)
    model = LongVILAModel(cfg)
    load_full_state_dict(model, full_sd)
    logits = model(batch["tokens"], batch["position_ids"], batch["frames"],
                   cu_seqlens=batch["cu_seqlens"], parallel_output=False).output
    losses = model(batch["tokens"], batch["position_ids"], batch["frames"], batch["labels"],
                   batch["cu_seqlens"]).output
    loss = losses.sum() / (batch["labels"] != IGNORE_INDEX).sum()
    loss.backward()
    return logits.detach(), loss.detach(), full_state_dict(model, grads=True)


def test_tensor_parallel_2_matches_tp_1():
    cfg = tiny_config("qwen2", "mlp_downsample", tied=False)
    lm, vt, proj = hf_modules(cfg)
    full = full_mcore_state_from_hf(cfg, lm, vt, proj)
    batch = packed_batch(cfg)
    (ref,) = run_distributed(_tp_worker, 1, 1, full, cfg.to_dict(), batch)
    outs = run_distributed(_tp_worker, 2, 2, full, cfg.to_dict(), batch)
    for logits, loss, grads in outs:
        torch.testing.assert_close(logits, ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, ref[1], rtol=1e-6, atol=1e-6)
        assert grads.keys() == ref[2].keys() and len(grads) > 20
        for name in ref[2]:
            torch.testing.assert_close(grads[name], ref[2][name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, n=name: f"{n}: {m}")
