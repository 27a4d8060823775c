"""--transformer-impl: ``auto`` never picks the Transformer Engine spec (no measured run of it
yet), even where transformer-engine imports on a GPU; an explicit ``transformer_engine`` warns
at start-up that the path is not verified."""

import pytest

from megatron_longvila.models import specs


@pytest.fixture
def te_on_gpu(monkeypatch):
    # what an NGC container looks like to the resolver: transformer-engine imports, CUDA is there
    monkeypatch.setattr(specs, "te_available", lambda: True)
    monkeypatch.setattr(specs.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(specs, "_warned", False)
    monkeypatch.delenv("RANK", raising=False)


def test_auto_is_local_until_te_is_verified(te_on_gpu, capsys):
    assert specs.TE_VERIFIED is False
    assert specs.resolve_transformer_impl("auto") == "local"
    assert specs.resolve_transformer_impl("local") == "local"
    assert capsys.readouterr().err == ""


def test_auto_would_pick_te_once_verified(te_on_gpu, monkeypatch):
    monkeypatch.setattr(specs, "TE_VERIFIED", True)
    assert specs.resolve_transformer_impl("auto") == "transformer_engine"


def test_explicit_te_warns_once_at_startup(te_on_gpu, capsys):
    from megatron_longvila.arguments import run_config_from_argv
    run_config_from_argv(["--transformer-impl", "transformer_engine"], 1)
    err = capsys.readouterr().err
    assert err.count("not been verified") == 1 and "--transformer-impl transformer_engine" in err
    assert specs.resolve_transformer_impl("transformer_engine") == "transformer_engine"
    assert capsys.readouterr().err == ""  # once per process


def test_explicit_te_without_te_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(specs, "te_available", lambda: False)
    with pytest.raises(ValueError, match="not importable"):
        specs.resolve_transformer_impl("transformer_engine")
