"""What we export reads the same in every transformers version VILA runs with (issue 20), and
the projector's 2x2 token order is a recorded property (both VILA orders).

The transformers-4 side is read by transformers 4.46 itself (VILA's pin) in its own
virtualenv, from a subprocess: ``VILA_VENV`` (default ``/work/vila-venv``; see
tools/vila_check/README.md). Only that test skips when the venv is absent; the JSON-level
checks and the transformers-5 side always run.
"""

import json
import os
import subprocess
import textwrap

import pytest
import torch
from safetensors import safe_open

from megatron_longvila.conversion import hf_io
from megatron_longvila.conversion.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_longvila.models.config import LongVILAConfig
from megatron_longvila.models.projector import MultimodalProjector, merge_2x2

from modelutil import hf_modules, init_single_process, tiny_config
from test_convert import write_vila

NEW_BASE = 123456.0  # the stage-4 base: not the source's, not transformers' default 10000
VILA_VENV = os.environ.get("VILA_VENV", "/work/vila-venv")


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_single_process()


def _json(path):
    with open(path) as f:
        return json.load(f)


def _as_t4_source(folder):
    """Rewrite llm/config.json (and llm_cfg) the way a released checkpoint spells RoPE:
    top-level rope_theta, no rope_parameters."""
    for path, key in ((os.path.join(folder, "llm", "config.json"), None),
                      (os.path.join(folder, "config.json"), "llm_cfg")):
        d = _json(path)
        c = d[key] if key else d
        theta = c.pop("rope_parameters")["rope_theta"]
        c["rope_theta"], c["rope_scaling"] = theta, None
        with open(path, "w") as f:
            json.dump(d, f)


def _stage4(meg, base):
    """What a stage-4 run saves: the weights under a config with a raised RoPE base."""
    import dataclasses

    from megatron_longvila import cpu_compat
    from megatron_longvila.models import LongVILAModel
    from megatron_longvila.checkpoint import (load_model_weights, read_checkpoint_config,
                                              save_model_checkpoint)
    cfg = read_checkpoint_config(meg)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, rope_base=base))
    cpu_compat.model_parallel_seed(3)
    model = LongVILAModel(cfg)
    load_model_weights(model, meg)
    save_model_checkpoint(model, meg, iteration=4, config=cfg)


@pytest.fixture(scope="module", params=["t4-source", "t5-source"])
def exported(request, tmp_path_factory):
    """A tiny VILA checkpoint (transformers-4 spelling with ``vision_model.`` names, or
    transformers-5 spelling without) -> Megatron -> stage-4 base -> HF."""
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = tiny_config("qwen2", "mlp_downsample", tied=False)
    lm, vt, proj = hf_modules(cfg, seed=4)
    t4 = request.param == "t4-source"
    hf = write_vila(str(tmp / "hf"), cfg, lm, vt, proj, vision_prefix="vision_model." if t4 else "",
                    head=True)
    if t4:
        _as_t4_source(hf)
    convert_hf_to_megatron(str(tmp / "meg"), hf_path=hf, dtype="fp32", in_process=True,
                           progress=False)
    _stage4(str(tmp / "meg"), NEW_BASE)
    convert_megatron_to_hf(str(tmp / "meg"), str(tmp / "out"), dtype="fp32", progress=False)
    return str(tmp / "out"), cfg


def test_exported_json_forms(exported):
    out, cfg = exported
    top = _json(os.path.join(out, "config.json"))
    for c in (_json(os.path.join(out, "llm", "config.json")), top["llm_cfg"]):
        assert c["rope_theta"] == NEW_BASE
        assert c["rope_parameters"] == {"rope_type": "default", "rope_theta": NEW_BASE}
        assert c["rope_scaling"] is None
        assert hf_io._rope_theta(c, "exported") == NEW_BASE
    assert top["resume_path"] and top["model_dtype"] == "torch.float32"
    with safe_open(os.path.join(out, "vision_tower", "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(n.startswith("vision_model.") for n in names), names[:3]
    assert any(n.startswith("vision_model.head.") for n in names)  # carried extras renamed too
    for pc in (_json(os.path.join(out, "mm_projector", "config.json")), top["mm_projector_cfg"]):
        assert pc["mm_projector_type"] == "mlp_downsample"
        assert pc["token_order"] == "column_major"


def test_disagreeing_rope_forms_are_refused():
    d = {"rope_theta": 1e6, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(hf_io.ConversionError, match="disagree"):
        hf_io._rope_theta(d, "llm/config.json")


def _t5_reading(out, ids):
    """transformers 5 (this venv): RoPE base, inv_freq, tower load report, logits."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, SiglipVisionModel
    conf = AutoConfig.from_pretrained(os.path.join(out, "llm"))
    lm = AutoModelForCausalLM.from_pretrained(os.path.join(out, "llm"),
                                              dtype=torch.float32).eval()
    vt, info = SiglipVisionModel.from_pretrained(os.path.join(out, "vision_tower"),
                                                 output_loading_info=True)
    top = Qwen2Config(**_json(os.path.join(out, "config.json"))["llm_cfg"])
    with torch.no_grad():
        logits = lm(torch.tensor([ids])).logits[0]
    return {"theta": float(conf.rope_parameters["rope_theta"]),
            "top_theta": float(top.rope_parameters["rope_theta"]),
            "inv_freq": lm.model.rotary_emb.inv_freq.tolist(),
            "missing": sorted(info["missing_keys"]), "logits": logits}


T4_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    # PyPI's torchvision for this torch is a CUDA build: declare its op names so that
    # transformers' import of it succeeds on the CPU (as tools/vila_check/vila_side.py does)
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("roi_align", "_roi_align_backward", "ps_roi_align", "_ps_roi_align_backward",
               "roi_pool", "_roi_pool_backward", "ps_roi_pool", "_ps_roi_pool_backward", "nms",
               "qnms", "qroi_align", "deform_conv2d", "_deform_conv2d_backward"):
        lib.define(op + "(Tensor x) -> Tensor")
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, SiglipVisionModel
    out, ids = sys.argv[1], json.loads(sys.argv[2])
    conf = AutoConfig.from_pretrained(out + "/llm")
    lm = AutoModelForCausalLM.from_pretrained(out + "/llm", torch_dtype=torch.float32).eval()
    vt, info = SiglipVisionModel.from_pretrained(out + "/vision_tower", output_loading_info=True)
    top = Qwen2Config(**json.load(open(out + "/config.json"))["llm_cfg"])
    with torch.no_grad():
        logits = lm(torch.tensor([ids])).logits[0]
    print(json.dumps({"version": transformers.__version__, "theta": conf.rope_theta,
                      "top_theta": top.rope_theta,
                      "inv_freq": lm.model.rotary_emb.inv_freq.tolist(),
                      "missing": sorted(info["missing_keys"]), "logits": logits.tolist()}))
""")


def test_transformers_4_and_5_read_the_same(exported):
    """transformers 4.46 (VILA's pin, in its venv) and 5 (ours) load the export with the same
    RoPE base (both llm/config.json and llm_cfg), the same rotary frequencies and logits at
    every position, and every SigLIP tensor."""
    py = os.path.join(VILA_VENV, "bin", "python")
    if not os.path.isfile(py):
        pytest.skip(f"no transformers-4.46 venv at {VILA_VENV} (tools/vila_check/README.md)")
    out, cfg = exported
    ids = [(7 * i + 3) % cfg.llm.vocab_size for i in range(40)]
    r = subprocess.run([py, "-c", T4_SCRIPT, out, json.dumps(ids)], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-2000:]
    t4 = json.loads(r.stdout.strip().splitlines()[-1])
    assert t4["version"].startswith("4.46")
    t5 = _t5_reading(out, ids)
    d = cfg.llm.kv_channels
    want = 1.0 / NEW_BASE ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    for r_ in (t4, t5):
        assert r_["theta"] == NEW_BASE and r_["top_theta"] == NEW_BASE
        torch.testing.assert_close(torch.tensor(r_["inv_freq"], dtype=torch.float64), want,
                                   rtol=1e-6, atol=0)
        assert r_["missing"] == [], r_["missing"][:5]
    err = (torch.tensor(t4["logits"]) - t5["logits"]).abs().max().item()
    assert err < 1e-5, f"transformers 4.46 vs 5 logits differ by {err}"


# ----------------------------------------------------------------------------- token order
def _index_merge(x, g, order):
    """The 2x2 merge, index by index: block (row pair i, column pair j) = the concatenation
    of patches (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1) of the zero-padded grid, at token
    i*h+j (row_major) or j*h+i (column_major)."""
    n, _, c = x.shape
    gp = g + g % 2
    grid = torch.zeros(n, gp, gp, c, dtype=x.dtype)
    grid[:, :g, :g] = x.reshape(n, g, g, c)
    h = gp // 2
    out = torch.empty(n, h * h, 4 * c, dtype=x.dtype)
    for i in range(h):
        for j in range(h):
            k = i * h + j if order == "row_major" else j * h + i
            out[:, k] = torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1],
                                   grid[:, 2 * i + 1, 2 * j], grid[:, 2 * i + 1, 2 * j + 1]], -1)
    return out


@pytest.mark.parametrize("ptype,order", [("mlp_downsample", "column_major"),
                                         ("mlp_downsample", "row_major"),
                                         ("mlp_downsample_2x2_fix", "row_major")])
@pytest.mark.parametrize("g", [4, 5])
def test_projector_token_order_index_definition(ptype, order, g):
    base = tiny_config("qwen2", ptype)
    cfg = LongVILAConfig(llm=base.llm, vision=base.vision, projector_type=ptype,
                         projector_token_order=order)
    torch.manual_seed(0)
    p = MultimodalProjector(cfg.projector_type, 6, 8, cfg.projector_token_order).double().eval()
    x = torch.randn(2, g * g, 6, dtype=torch.float64)
    want = p.layers[1:](_index_merge(x, g, order))
    torch.testing.assert_close(p(x), want, rtol=0, atol=0)
    torch.testing.assert_close(merge_2x2(x, order), _index_merge(x, g, order), rtol=0, atol=0)
    # the two orders are different functions (a 4x4 grid transposed)
    other = "column_major" if order == "row_major" else "row_major"
    assert not torch.equal(merge_2x2(x, order), merge_2x2(x, other))


def test_token_order_is_recorded_and_checked():
    base = tiny_config("qwen2", "mlp_downsample")
    assert base.projector_token_order == "column_major"  # the documented default
    d = base.to_dict()
    assert d["projector_token_order"] == "column_major"
    d.pop("projector_token_order")  # a checkpoint from before the field
    assert LongVILAConfig.from_dict(d).projector_token_order == "column_major"
    row = LongVILAConfig(llm=base.llm, vision=base.vision, projector_token_order="row_major")
    assert LongVILAConfig.from_dict(row.to_dict()).projector_token_order == "row_major"
    assert LongVILAConfig(llm=base.llm, vision=base.vision,
                          projector_type="mlp_downsample_2x2_fix").projector_token_order == \
        "row_major"
    with pytest.raises(ValueError, match="row-major order only"):
        LongVILAConfig(llm=base.llm, vision=base.vision, projector_type="mlp_downsample_2x2_fix",
                       projector_token_order="column_major")
    with pytest.raises(ValueError, match="no 2x2 merge"):
        LongVILAConfig(llm=base.llm, vision=base.vision, projector_type="linear",
                       projector_token_order="row_major")
    with pytest.raises(ValueError, match="unknown token order"):
        LongVILAConfig(llm=base.llm, vision=base.vision, projector_token_order="diagonal")
    # the warning names the VILA version that reads the export differently
    w = hf_io.token_order_warning(base)
    assert "36f6adc" in w and "transposed" in w
    assert hf_io.token_order_warning(base, "longvila") is None
    assert "54c9706" in hf_io.token_order_warning(row, "longvila")
    assert hf_io.token_order_warning(row, "head") is None


@pytest.mark.parametrize("order", ["row_major", "column_major"])
def test_token_order_through_conversion(tmp_path, order):
    """HF (order recorded in mm_projector/config.json) -> Megatron (config records it, the
    model merges that way) -> HF (recorded again)."""
    from megatron_longvila.checkpoint import read_checkpoint_config
    cfg = tiny_config("qwen2", "mlp_downsample", tied=False)
    lm, vt, proj = hf_modules(cfg, seed=2)
    hf = write_vila(str(tmp_path / "hf"), cfg, lm, vt, proj)
    pc = os.path.join(hf, "mm_projector", "config.json")
    d = _json(pc)
    d["token_order"] = order
    with open(pc, "w") as f:
        json.dump(d, f)
    convert_hf_to_megatron(str(tmp_path / "meg"), hf_path=hf, dtype="fp32", in_process=True,
                           progress=False)
    assert read_checkpoint_config(str(tmp_path / "meg")).projector_token_order == order
    convert_megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "out"), dtype="fp32",
                           progress=False)
    assert _json(str(tmp_path / "out" / "mm_projector" / "config.json"))["token_order"] == order
    d["token_order"] = "sideways"
    with open(pc, "w") as f:
        json.dump(d, f)
    with pytest.raises(hf_io.ConversionError, match="token_order 'sideways'"):
        convert_hf_to_megatron(str(tmp_path / "meg2"), hf_path=hf, dtype="fp32",
                               in_process=True, progress=False)
