"""HF (VILA layout) <-> Megatron converters: exact round trips, logit parity, TP=1 and TP=2."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_longvila import cpu_compat
from megatron_longvila.conversion.convert import convert_hf_to_megatron, convert_megatron_to_hf

from dist import run_distributed
from modelutil import hf_modules, init_single_process, packed_batch, tiny_config
from modelutil import hf_reference_logits as reference_logits


# ----------------------------------------------------------------------------- fixtures
def write_tokenizer(folder, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"t{i}": i for i in range(vocab_size - 2)}
    vocab.update({"<unk>": vocab_size - 2, "<|endoftext|>": vocab_size - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                            eos_token="<|endoftext|>").save_pretrained(folder)


def write_vila(folder, cfg, lm, vt, proj, vision_prefix="vision_model.", head=False,
               tokenizer=True, num_video_frames=8):
    """The folder layout VILA's save_pretrained writes (llm/, vision_tower/, mm_projector/)."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
    lm.save_pretrained(os.path.join(folder, "llm"))
    if tokenizer:
        write_tokenizer(os.path.join(folder, "llm"), cfg.llm.vocab_size)
    vdir = os.path.join(folder, "vision_tower")
    os.makedirs(vdir, exist_ok=True)
    vconf = SiglipVisionConfig(**{k: v for k, v in vt.config.to_dict().items()
                                  if not k.startswith("_")})
    sd = dict(vt.state_dict())
    if head:  # a released so400m tower keeps the MAP pooling head LongVILA does not use
        vconf.vision_use_head = True
        with_head = SiglipVisionModel(vconf)
        sd.update({k: v for k, v in with_head.state_dict().items() if k.startswith("head.")})
    vconf.architectures = ["SiglipVisionModel"]
    vconf.save_pretrained(vdir)
    save_file({vision_prefix + k: v.contiguous() for k, v in sd.items()},
              os.path.join(vdir, "model.safetensors"), metadata={"format": "pt"})
    s = cfg.vision.image_size
    SiglipImageProcessor(size={"height": s, "width": s}, image_mean=[0.5] * 3,
                         image_std=[0.5] * 3).save_pretrained(vdir)
    pdir = os.path.join(folder, "mm_projector")
    os.makedirs(pdir, exist_ok=True)
    pconf = {"architectures": ["MultimodalProjector"], "mm_projector_type": cfg.projector_type,
             "model_type": "v2l_projector", "dtype": "float32"}
    with open(os.path.join(pdir, "config.json"), "w") as f:
        json.dump(pconf, f)
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()},
              os.path.join(pdir, "model.safetensors"), metadata={"format": "pt"})
    top = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
           "llm_cfg": lm.config.to_dict(), "vision_tower_cfg": vconf.to_dict(),
           "mm_projector_cfg": pconf, "hidden_size": cfg.llm.hidden_size,
           "mm_hidden_size": cfg.vision.hidden_size,
           "mm_vision_select_layer": cfg.vision_select_layer,
           "mm_vision_select_feature": "cls_patch", "num_video_frames": num_video_frames,
           "image_aspect_ratio": "resize", "mm_use_im_start_end": False,
           "mm_use_im_patch_token": False, "model_dtype": "torch.float32"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(top, f)
    return folder


# ----------------------------------------------------------------------------- helpers
PARTS = ("llm", "vision_tower", "mm_projector")
SIDE = {"llm": ("tokenizer.json", "tokenizer_config.json", "generation_config.json"),
        "vision_tower": ("preprocessor_config.json",), "mm_projector": ()}


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_single_process()


def _json(path):
    with open(path) as f:
        return json.load(f)


# Keys the export writes in the forms every VILA/transformers version reads (hf_io.export_*):
# compared by meaning (the RoPE base), not spelling.
EXPORT_FORMS = {"rope_theta", "rope_scaling", "rope_parameters", "token_order", "resume_path"}


def _same_config(ca, cb, where):
    from megatron_longvila.conversion.hf_io import _rope_theta
    if "rope_parameters" in ca or "rope_theta" in ca:
        assert _rope_theta(ca, where) == _rope_theta(cb, where), where
    for key in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg"):
        if key in ca:
            _same_config(ca[key], cb[key], f"{where}:{key}")
    strip = EXPORT_FORMS | {"llm_cfg", "vision_tower_cfg", "mm_projector_cfg"}
    assert ({k: v for k, v in ca.items() if k not in strip}
            == {k: v for k, v in cb.items() if k not in strip}), where


def assert_same_hf(a, b):
    """Every tensor bit-identical, same names (the SigLIP tower's with the ``vision_model.``
    prefix that transformers 4.46 loads, added where the source had none); configs identical
    but for the exported forms (EXPORT_FORMS, same RoPE base); side files identical."""
    _same_config(_json(os.path.join(a, "config.json")), _json(os.path.join(b, "config.json")),
                 "config.json")
    for p in PARTS:
        ta = load_file(os.path.join(a, p, "model.safetensors"))
        tb = load_file(os.path.join(b, p, "model.safetensors"))
        if p == "vision_tower":
            ta = {(k if k.startswith("vision_model.") else "vision_model." + k): v
                  for k, v in ta.items()}
        assert sorted(ta) == sorted(tb), p
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{p}: {k}"
        _same_config(_json(os.path.join(a, p, "config.json")),
                     _json(os.path.join(b, p, "config.json")), p)
        for f in SIDE[p]:
            if f == "tokenizer_config.json":  # the exported form transformers 4.46 also loads
                from megatron_longvila.conversion.hf_io import T5_ONLY_TOKENIZER_CLASSES
                ta, tb = _json(os.path.join(a, p, f)), _json(os.path.join(b, p, f))
                cls = ta.get("tokenizer_class")
                ta["tokenizer_class"] = T5_ONLY_TOKENIZER_CLASSES.get(cls, cls)
                assert ta == tb, f"{p}/{f}"
                continue
            with open(os.path.join(a, p, f), "rb") as fa, open(os.path.join(b, p, f), "rb") as fb:
                assert fa.read() == fb.read(), f"{p}/{f}"


def megatron_logits(cfg, load_dir, batch, seed=5):
    """A fresh (differently seeded) LongVILAModel loaded from the checkpoint, as the trainer does."""
    from megatron_longvila.models import LongVILAModel
    from megatron_longvila.checkpoint import load_model_weights
    cpu_compat.model_parallel_seed(seed)
    model = LongVILAModel(cfg).eval()
    load_model_weights(model, load_dir)
    with torch.no_grad():
        return model(batch["tokens"], batch["position_ids"], batch["frames"],
                     cu_seqlens=batch["cu_seqlens"], parallel_output=False).output


CASES = {  # family, projector, tied embeddings, vision prefix on disk, SigLIP head present
    "qwen2-gqa-bias-tied": ("qwen2", "mlp_downsample", True, "vision_model.", True),
    "llama3-untied": ("llama", "mlp_downsample_2x2_fix", False, "", False),
    "qwen2-untied": ("qwen2", "mlp2x_gelu", False, "vision_model.", False),
    "llama3-tied": ("llama", "linear", True, "", True),
}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_tp1_exact_with_logit_parity(tmp_path, case):
    family, projector, tied, prefix, head = CASES[case]
    cfg = tiny_config(family, projector, tied=tied)
    lm, vt, proj = hf_modules(cfg, seed=7)
    hf = write_vila(str(tmp_path / "hf"), cfg, lm, vt, proj, vision_prefix=prefix, head=head)
    s = convert_hf_to_megatron(str(tmp_path / "meg"), hf_path=hf, tensor_parallel_size=1,
                               dtype="fp32", in_process=True, progress=False)
    assert s["extra_tensors"] == (11 if head else 0)
    with open(tmp_path / "meg" / "latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == "release"
    # The Megatron model (loaded the trainer's way) computes the HF reference's logits.
    batch = packed_batch(cfg)
    want = reference_logits(cfg, lm, vt, proj, batch)
    got = megatron_logits(cfg, str(tmp_path / "meg"), batch)
    err = (got - want).abs().max().item()
    assert err < 1e-4, f"max abs logit error {err}"
    # ... and converts back to the very same tensors and configs.
    convert_megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "hf2"), dtype="fp32",
                           progress=False)
    assert_same_hf(hf, str(tmp_path / "hf2"))


def test_bf16_round_trip_is_exact(tmp_path):
    cfg = tiny_config("qwen2", tied=False)
    lm, vt, proj = hf_modules(cfg, seed=3)
    lm, vt, proj = lm.to(torch.bfloat16), vt.to(torch.bfloat16), proj.to(torch.bfloat16)
    hf = write_vila(str(tmp_path / "hf"), cfg, lm, vt, proj)
    convert_hf_to_megatron(str(tmp_path / "meg"), hf_path=hf, dtype="bf16", in_process=True,
                           progress=False)
    convert_megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "hf2"), dtype="bf16",
                           progress=False)
    a = load_file(os.path.join(hf, "llm", "model.safetensors"))
    b = load_file(str(tmp_path / "hf2" / "llm" / "model.safetensors"))
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    # HF writes its own dtype into the config ("dtype": "bfloat16"): carried unchanged.
    _same_config(_json(os.path.join(hf, "llm", "config.json")),
                 _json(str(tmp_path / "hf2" / "llm" / "config.json")), "llm")


def _tp_worker(rank, world, jobs):
    """Load each (config, checkpoint, batch) at TP=world; the logits of every job."""
    from megatron.core import parallel_state
    from megatron_longvila.models import LongVILAModel
    from megatron_longvila.models.config import LongVILAConfig
    from megatron_longvila.checkpoint import load_model_weights
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    out = []
    for cfg_dict, d, batch in jobs:
        cpu_compat.model_parallel_seed(11)
        model = LongVILAModel(LongVILAConfig.from_dict(cfg_dict)).eval()
        load_model_weights(model, d)
        with torch.no_grad():
            out.append(model(batch["tokens"], batch["position_ids"], batch["frames"],
                             cu_seqlens=batch["cu_seqlens"], parallel_output=False).output.numpy())
    return out  # numpy: pickled by value (no shared-memory handles outliving the worker)


def test_tensor_parallel_2(tmp_path):
    """TP=2: Megatron-Core's save from two processes (--build-model), and every case's
    streamed checkpoint, load at TP=2 with the HF reference's logits; TP=2 -> HF is exact."""
    jobs, wants = [], []
    for case, (family, projector, tied, prefix, head) in CASES.items():
        cfg = tiny_config(family, projector, tied=tied)
        lm, vt, proj = hf_modules(cfg, seed=9)
        hf = write_vila(str(tmp_path / case / "hf"), cfg, lm, vt, proj, vision_prefix=prefix,
                        head=head)
        batch = packed_batch(cfg)
        want = reference_logits(cfg, lm, vt, proj, batch)
        streamed = str(tmp_path / case / "meg")
        convert_hf_to_megatron(streamed, hf_path=hf, tensor_parallel_size=2, dtype="fp32",
                               in_process=True, progress=False)
        jobs.append((cfg.to_dict(), streamed, batch))
        wants.append(want)
        if case == "qwen2-untied":  # GQA + QKV bias + untied output layer
            tp2 = str(tmp_path / case / "meg_tp2")
            s = convert_hf_to_megatron(tp2, hf_path=hf, tensor_parallel_size=2, dtype="fp32",
                                       progress=False, build_model=True)
            assert s["tensor_model_parallel_size"] == 2
            files = sorted(n for n in os.listdir(os.path.join(tp2, "release"))
                           if n.endswith(".distcp"))
            assert files == ["__0_0.distcp", "__1_0.distcp"]  # written by two ranks
            jobs.append((cfg.to_dict(), tp2, batch))
            wants.append(want)
            # ... at TP=1 too, and back to the very same HF tensors and configs.
            assert (megatron_logits(cfg, tp2, batch) - want).abs().max().item() < 1e-4
            convert_megatron_to_hf(tp2, str(tmp_path / case / "hf2"), dtype="fp32",
                                   progress=False)
            assert_same_hf(hf, str(tmp_path / case / "hf2"))
    for rank_out in run_distributed(_tp_worker, 2, jobs):
        for (_, d, _), got, want in zip(jobs, rank_out, wants):
            err = (torch.from_numpy(got) - want).abs().max().item()
            assert err < 1e-4, f"{d}: max abs logit error {err} at TP=2"


def test_plain_model_folders_and_fresh_configs(tmp_path, capfd):
    """Stage 1 input: plain Qwen2 + SigLIP folders (no tokenizer, no projector, no prefix)."""
    from transformers import AutoModelForCausalLM, SiglipVisionModel
    cfg = tiny_config("qwen2", "mlp_downsample", tied=True)
    lm, vt, _ = hf_modules(cfg, seed=4)
    lm.save_pretrained(str(tmp_path / "qwen2"))
    vt.save_pretrained(str(tmp_path / "siglip"))
    meg = str(tmp_path / "meg")
    s = convert_hf_to_megatron(meg, llm_path=str(tmp_path / "qwen2"),
                               vision_path=str(tmp_path / "siglip"),
                               projector_type="mlp_downsample", dtype="fp32", seed=21,
                               in_process=True, progress=False)
    assert s["projector_initialized"]
    assert "no tokenizer files" in capfd.readouterr().err
    # No carried configs for the projector / top level: the VILA files are generated.
    os.remove(os.path.join(meg, "hf_assets", "llm", "config.json"))
    out = str(tmp_path / "hf")
    convert_megatron_to_hf(meg, out, dtype="fp32", num_video_frames=16, progress=False)
    top = _json(os.path.join(out, "config.json"))
    for key in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg"):
        assert isinstance(top[key], dict)
    assert top["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample"
    assert top["mm_projector_cfg"]["model_type"] == "v2l_projector"
    assert top["mm_vision_select_layer"] == -2 and top["num_video_frames"] == 16
    assert top["hidden_size"] == 64 and top["mm_hidden_size"] == 32
    assert top["llm_cfg"]["architectures"] == ["Qwen2ForCausalLM"]
    assert os.path.isfile(os.path.join(out, "vision_tower", "preprocessor_config.json"))
    # transformers reads the written folders back, with the same weights.
    lm2 = AutoModelForCausalLM.from_pretrained(os.path.join(out, "llm"),
                                               attn_implementation="eager").eval()
    vt2 = SiglipVisionModel.from_pretrained(os.path.join(out, "vision_tower"),
                                            attn_implementation="eager").eval()
    for a, b in ((lm, lm2), (vt, vt2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # The fresh projector is VILA's module with its default init under the seed.
    from megatron_longvila.models.projector import MultimodalProjector
    torch.manual_seed(21)
    fresh = MultimodalProjector("mlp_downsample", 32, 64).state_dict()
    ptens = load_file(os.path.join(out, "mm_projector", "model.safetensors"))
    assert ptens.keys() == fresh.keys() and all(torch.equal(ptens[k], fresh[k]) for k in fresh)


@pytest.mark.parametrize("tied", [True, False])
def test_streaming_writer_equals_megatron_save(tmp_path, tied):
    """The streaming writer's checkpoint loads to exactly what Megatron-Core's save gives."""
    from megatron_longvila.models import LongVILAModel
    from megatron_longvila.checkpoint import load_model_weights
    cfg = tiny_config("llama", "mlp_downsample", tied=tied)
    lm, vt, proj = hf_modules(cfg, seed=13)
    hf = write_vila(str(tmp_path / "hf"), cfg, lm, vt, proj)
    states = []
    for build in (False, True):
        d = str(tmp_path / f"meg{int(build)}")
        s = convert_hf_to_megatron(d, hf_path=hf, dtype="bf16", in_process=True, progress=False,
                                   build_model=build)
        assert s["writer"] == ("megatron-core save (model built)" if build else "streaming")
        cpu_compat.model_parallel_seed(100 + build)  # different init: everything must load
        model = LongVILAModel(cfg, dtype=torch.bfloat16)
        load_model_weights(model, d)
        states.append({k: v.clone() for k, v in model.state_dict().items()
                       if not k.endswith("_extra_state")})
    assert states[0].keys() == states[1].keys() and len(states[0]) > 50
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_sharded_hf_input_and_trainer_saved_checkpoint(tmp_path):
    """A sharded HF llm folder (index.json) converts; a checkpoint the trainer's own
    save_model_checkpoint wrote (iteration 5, no HF assets) converts back to the same tensors."""
    from megatron_longvila.models import LongVILAModel
    from megatron_longvila.checkpoint import load_model_weights, save_model_checkpoint
    cfg = tiny_config("llama", "mlp_downsample", tied=False)
    lm, vt, proj = hf_modules(cfg, seed=17)
    hf = write_vila(str(tmp_path / "hf"), cfg, lm, vt, proj, tokenizer=False)
    llm_dir = os.path.join(hf, "llm")
    for f in os.listdir(llm_dir):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(llm_dir, f))
    lm.save_pretrained(llm_dir, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(llm_dir, "model.safetensors.index.json"))
    meg = str(tmp_path / "meg")
    convert_hf_to_megatron(meg, hf_path=hf, dtype="fp32", in_process=True, progress=False)
    cpu_compat.model_parallel_seed(3)
    model = LongVILAModel(cfg)
    load_model_weights(model, meg)
    trained = str(tmp_path / "trained")
    save_model_checkpoint(model, trained, iteration=5)
    out = str(tmp_path / "hf2")
    convert_megatron_to_hf(trained, out, dtype="fp32", progress=False)
    for part, module in (("llm", lm), ("vision_tower", vt), ("mm_projector", proj)):
        got = load_file(os.path.join(out, part, "model.safetensors"))
        want = {("vision_model." + k if part == "vision_tower" else k): v
                for k, v in module.state_dict().items()}
        assert got.keys() == want.keys(), part
        assert all(torch.equal(got[k], want[k]) for k in want), part


def test_released_vila_config_layout(tmp_path):
    """Configs in the shape of a released VILA/NVILA checkpoint (transformers-4 keys:
    rope_theta, torch_dtype, rope_scaling null, the VILA top-level keys) convert with logit
    parity and come back verbatim."""
    cfg = tiny_config("qwen2", "mlp_downsample", tied=False)
    lm, vt, proj = hf_modules(cfg, seed=23)
    hf = write_vila(str(tmp_path / "hf"), cfg, lm, vt, proj)
    l, v = cfg.llm, cfg.vision
    llm_cfg = {"_name_or_path": "./llm", "architectures": ["Qwen2ForCausalLM"],
               "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
               "hidden_act": "silu", "hidden_size": l.hidden_size, "initializer_range": 0.02,
               "intermediate_size": l.ffn_hidden_size,
               "max_position_embeddings": l.max_position_embeddings, "max_window_layers": 28,
               "model_max_length": 8192, "model_type": "qwen2",
               "num_attention_heads": l.num_attention_heads, "num_hidden_layers": l.num_layers,
               "num_key_value_heads": l.num_query_groups, "rms_norm_eps": l.norm_eps,
               "rope_scaling": None, "rope_theta": l.rope_base, "sliding_window": None,
               "tie_word_embeddings": False, "tokenizer_model_max_length": 8192,
               "tokenizer_padding_side": "right", "torch_dtype": "float32",
               "use_cache": True, "use_sliding_window": False, "vocab_size": l.vocab_size}
    vis_cfg = {"_name_or_path": "./vision_tower", "architectures": ["SiglipVisionModel"],
               "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh",
               "hidden_size": v.hidden_size, "image_size": v.image_size,
               "intermediate_size": v.intermediate_size, "layer_norm_eps": v.norm_eps,
               "model_type": "siglip_vision_model", "num_attention_heads": v.num_attention_heads,
               "num_channels": 3, "num_hidden_layers": v.num_layers, "patch_size": v.patch_size,
               "torch_dtype": "float32"}
    proj_cfg = {"_name_or_path": "./mm_projector", "architectures": ["MultimodalProjector"],
                "mm_projector_type": "mlp_downsample", "model_type": "v2l_projector",
                "torch_dtype": "float32"}
    top = {"_name_or_path": "Efficient-Large-Model/LongVILA-tiny",
           "architectures": ["LlavaLlamaModel"], "drop_path_rate": 0.0, "dynamic_s2": False,
           "fps": 0.0, "hidden_size": l.hidden_size, "image_aspect_ratio": "resize",
           "interpolate_mode": "linear", "llm_cfg": llm_cfg, "mm_hidden_size": v.hidden_size,
           "mm_projector_cfg": proj_cfg, "mm_projector_lr": None, "mm_use_im_patch_token": False,
           "mm_use_im_start_end": False, "mm_vision_select_feature": "cls_patch",
           "mm_vision_select_layer": -2, "model_dtype": "torch.float32",
           "model_type": "llava_llama", "num_time_tokens": 0, "num_video_frames": 256,
           "resume_path": "./vlm", "s2": False, "s2_max_split_size": 336,
           "s2_scales": "336,672,1008", "soft_ce_std": 1.0, "time_token_format": "<t{t}>",
           "transformers_version": "4.46.0", "tune_language_model": True,
           "tune_mm_projector": True, "tune_vision_tower": True, "vision_resolution": -1,
           "vision_tower_cfg": vis_cfg}
    for path, d in (("config.json", top), ("llm/config.json", llm_cfg),
                    ("vision_tower/config.json", vis_cfg),
                    ("mm_projector/config.json", proj_cfg)):
        with open(os.path.join(hf, path), "w") as f:
            json.dump(d, f, indent=2)
    meg = str(tmp_path / "meg")
    convert_hf_to_megatron(meg, hf_path=hf, dtype="fp32", in_process=True, progress=False)
    saved = _json(os.path.join(meg, "longvila_config.json"))
    assert saved["vision_select_layer"] == -2 and saved["llm"]["rope_base"] == l.rope_base
    batch = packed_batch(cfg)
    err = (megatron_logits(cfg, meg, batch) - reference_logits(cfg, lm, vt, proj, batch))
    assert err.abs().max().item() < 1e-4
    convert_megatron_to_hf(meg, str(tmp_path / "hf2"), dtype="fp32", progress=False)
    assert_same_hf(hf, str(tmp_path / "hf2"))


def _tool(name):
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "tools", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_default_dtype_is_the_source_s_fp32_round_trip_at_tp2(tmp_path):
    """Issue 13 item 5: with default flags an fp32 VILA checkpoint converts at TP=2 (the model
    built and saved by two ranks) and back bit-exactly; the Megatron tensors are fp32."""
    import torch.distributed.checkpoint as dcp
    cfg = tiny_config("qwen2", "mlp_downsample", tied=False)
    lm, vt, proj = hf_modules(cfg, seed=31)
    hf = write_vila(str(tmp_path / "hf"), cfg, lm, vt, proj)
    meg, back = str(tmp_path / "meg"), str(tmp_path / "hf2")
    assert _tool("convert_hf_to_megatron")(
        ["--hf-path", hf, "--save", meg, "--tensor-model-parallel-size", "2", "--build-model",
         "--no-progress", "--summary-json", str(tmp_path / "a.json")]) == 0
    assert _json(str(tmp_path / "a.json"))["dtype"] == "fp32"
    meta = dcp.FileSystemReader(os.path.join(meg, "release")).read_metadata().state_dict_metadata
    dtypes = {m.properties.dtype for m in meta.values() if hasattr(m, "properties")}
    assert dtypes == {torch.float32}
    assert _tool("convert_megatron_to_hf")(["--load", meg, "--save", back, "--no-progress",
                                            "--summary-json", str(tmp_path / "b.json")]) == 0
    assert _json(str(tmp_path / "b.json"))["dtype"] == "fp32"
    assert_same_hf(hf, back)
