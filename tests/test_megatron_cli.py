"""Megatron-LM command lines (issue 15 items 1-2): Megatron-LM's flags with Megatron-LM's
meaning mapped onto the RunConfig; every other flag of Megatron-LM's parser refused by name
with a one-line reason."""

import pytest

from megatron_longvila.arguments import UnsupportedFlagError, build_parser, run_config_from_argv
from megatron_longvila.megatron_cli import PREFIX, supported_flags
from megatron_longvila.megatron_lm_flags import FLAGS
from megatron_longvila.models.config import get_preset


def _cfg(argv, world=1):
    return run_config_from_argv([str(a) for a in argv], world)


def test_a_qwen2_shape_given_by_megatron_flags_is_the_preset():
    """Qwen2-7B's LLM described the Megatron-LM way (over the tiny preset, SigLIP tower) builds
    exactly the qwen2-7b preset; leaving out --add-qkv-bias / --untie... changes it."""
    megatron = ["--vision-model", "siglip-so400m-patch14-384",
                "--num-layers", 28, "--hidden-size", 3584, "--ffn-hidden-size", 18944,
                "--num-attention-heads", 28, "--group-query-attention", "--num-query-groups", 4,
                "--kv-channels", 128, "--max-position-embeddings", 32768,
                "--position-embedding-type", "rope", "--rotary-base", 1000000,
                "--rotary-percent", 1.0, "--normalization", "RMSNorm", "--norm-epsilon", 1e-6,
                "--swiglu", "--add-qkv-bias", "--disable-bias-linear",
                "--untie-embeddings-and-output-weights", "--vocab-size", 152064,
                "--attention-dropout", 0.0, "--hidden-dropout", 0.0, "--use-mcore-models",
                "--seq-length", 256]
    want = get_preset("qwen2-7b")
    assert _cfg(megatron).arch == want
    assert _cfg(["--model", "qwen2-7b", "--seq-length", 256]).arch == want
    tied = [a for a in megatron if a != "--untie-embeddings-and-output-weights"]
    assert _cfg(tied).arch.llm.tie_word_embeddings  # the tiny preset's, not Qwen2-7B's
    # Megatron-LM pads the vocabulary to a multiple of 128 x TP
    i = megatron.index("--vocab-size")
    assert _cfg(megatron[:i + 1] + [151655] + megatron[i + 2:]).arch.llm.vocab_size == 151680
    assert _cfg(["--vocab-size", 500, "--tensor-model-parallel-size", 2], world=2) \
        .arch.llm.vocab_size == 512


def test_training_length_in_samples_and_warmup_fraction():
    c = _cfg(["--global-batch-size", 4, "--train-samples", 42, "--lr-warmup-fraction", 0.25])
    assert c.training.train_iters == 10  # whole global batches, as Megatron-LM
    o = c.optimizer
    assert (o.decay_steps, o.warmup_steps, o.wd_incr_steps) == (42, 10, 42)
    c = _cfg(["--global-batch-size", 4, "--train-samples", 40, "--lr-decay-samples", 36,
              "--lr-warmup-samples", 8])
    assert (c.optimizer.decay_steps, c.optimizer.warmup_steps) == (36, 8)
    # iterations: the schedule counts samples as before (iters x global batch)
    c = _cfg(["--global-batch-size", 2, "--train-iters", 6, "--lr-warmup-fraction", 0.5])
    assert (c.optimizer.decay_steps, c.optimizer.warmup_steps) == (12, 6)
    with pytest.raises(ValueError, match="exclusive"):
        _cfg(["--train-samples", 8, "--train-iters", 2])
    with pytest.raises(ValueError, match="need --train-samples"):
        _cfg(["--lr-warmup-samples", 8])


def test_the_scheduler_follows_the_sample_schedule():
    """Built by the trainer's builder: the learning rate after warm-up samples is the peak."""
    from modelutil import init_single_process
    from megatron_longvila.training.train import build_model, build_optimizer
    init_single_process()
    c = _cfg(["--global-batch-size", 1, "--train-samples", 10, "--lr-warmup-samples", 4,
              "--lr", 1e-3, "--min-lr", 1e-4, "--lr-decay-style", "linear",
              "--start-weight-decay", 0.0, "--end-weight-decay", 0.1,
              "--weight-decay-incr-style", "linear", "--optimizer", "sgd"])
    ddp, _ = build_model(c)
    opt, sched = build_optimizer(c, ddp)
    lrs, wds = [], []
    for _ in range(10):
        sched.step(increment=1)
        lrs.append(opt.param_groups[0]["lr"])
        wds.append(sched.get_wd())
    assert lrs[3] == pytest.approx(1e-3) and lrs[1] == pytest.approx(0.5e-3)
    assert lrs[9] == pytest.approx(1e-4) and wds[9] == pytest.approx(0.1)
    assert wds[4] == pytest.approx(0.05)
    inner = opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") \
        else opt.optimizer
    assert type(inner).__name__ == "SGD"


@pytest.mark.parametrize("argv,needle", [
    (["--normalization", "LayerNorm"], "--normalization LayerNorm: not supported (LongVILA's LLMs use RMSNorm)"),
    (["--position-embedding-type", "learned_absolute"], "RoPE"),
    (["--hidden-dropout", "0.1"], "without dropout"),
    (["--kv-channels", "32"], "--kv-channels 32"),
    (["--lr-warmup-fraction", "0.5", "--lr-warmup-iters", "2"], "exclusive"),
])
def test_megatron_values_this_trainer_does_not_implement_are_refused(argv, needle):
    with pytest.raises(ValueError) as e:
        _cfg(argv)
    assert needle in str(e.value)


def test_every_other_megatron_flag_is_refused_with_one_line():
    parser = build_parser()
    ours = set(supported_flags(parser))
    assert {"--num-layers", "--train-samples", "--lr-warmup-fraction", "--ckpt-format",
            "--normalization", "--untie-embeddings-and-output-weights"} <= ours
    refused = sorted(set(FLAGS) - ours)
    assert len(refused) > 700
    for flag in refused:
        with pytest.raises(UnsupportedFlagError) as e:
            parser.parse_args([flag, "1"])
        msg = str(e.value)
        assert msg.startswith(f"{flag}: {PREFIX}: ") and "\n" not in msg, msg
        assert len(msg) > len(flag) + len(PREFIX) + 10
    reasons = {flag: str(_refuse(parser, flag)) for flag in
               ("--pipeline-model-parallel-layout", "--num-experts", "--fp8-format",
                "--use-torch-fsdp2", "--wandb-entity")}
    assert "pipeline parallelism" in reasons["--pipeline-model-parallel-layout"]
    assert "mixture-of-experts" in reasons["--num-experts"]
    assert "FP8" in reasons["--fp8-format"]
    assert "--use-distributed-optimizer" in reasons["--use-torch-fsdp2"]
    # W&B is supported (issue 15 item 4): the refusal of its other flags names the supported ones
    assert "--wandb-project" in reasons["--wandb-entity"]


def _refuse(parser, flag):
    with pytest.raises(UnsupportedFlagError) as e:
        parser.parse_args([flag])
    return e.value


def test_the_cli_prints_the_reason_on_one_line(tmp_path):
    from trainutil import run_cli
    p = run_cli(["--num-experts", 8], check=False, timeout=600)
    assert p.returncode == 2
    err = [line for line in p.stdout.splitlines() if "error" in line]
    assert err == ["pretrain_longvila.py: error: --num-experts: " + PREFIX +
                   ": mixture-of-experts layers: LongVILA's LLMs (Qwen2, Llama-3) are dense"], \
        p.stdout[-2000:]
