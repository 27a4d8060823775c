"""Converter input errors: clear messages naming the file/tensor/key, nothing left behind."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_longvila.conversion.convert import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_longvila.conversion.hf_io import ConversionError, StreamingSafetensorsWriter

from modelutil import hf_modules, init_single_process, tiny_config
from test_convert import write_vila


@pytest.fixture(scope="module", autouse=True)
def _megatron():
    init_single_process()


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("qwen2", "mlp_downsample", tied=False)
    return cfg, hf_modules(cfg, seed=2)


@pytest.fixture
def vila(tmp_path, tiny):
    cfg, (lm, vt, proj) = tiny
    return write_vila(str(tmp_path / "hf"), cfg, lm, vt, proj)


def _nothing_left(tmp_path, save="meg"):
    assert not os.path.exists(tmp_path / save)
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n], os.listdir(tmp_path)


def _convert(tmp_path, hf, **kw):
    return convert_hf_to_megatron(str(tmp_path / "meg"), hf_path=hf, dtype="fp32",
                                  in_process=True, progress=False, **kw)


def _edit_json(path, **changes):
    with open(path) as f:
        d = json.load(f)
    d.update(changes)
    with open(path, "w") as f:
        json.dump(d, f)


def _edit_tensors(path, fn):
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_missing_weights_file(tmp_path, vila):
    os.remove(os.path.join(vila, "llm", "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing file .*llm/model\.safetensors"):
        _convert(tmp_path, vila)
    _nothing_left(tmp_path)


def test_missing_part_directory(tmp_path, vila):
    import shutil
    shutil.rmtree(os.path.join(vila, "mm_projector"))
    with pytest.raises(ConversionError, match=r"missing directory .*mm_projector"):
        _convert(tmp_path, vila)
    _nothing_left(tmp_path)


def test_missing_tensor_is_named(tmp_path, vila):
    name = "vision_model.encoder.layers.1.mlp.fc2.weight"
    _edit_tensors(os.path.join(vila, "vision_tower", "model.safetensors"), lambda sd: sd.pop(name))
    with pytest.raises(ConversionError, match=rf"vision_tower: missing tensor {name}"):
        _convert(tmp_path, vila)
    _nothing_left(tmp_path)


def test_shape_that_does_not_match_the_config(tmp_path, vila):
    _edit_json(os.path.join(vila, "llm", "config.json"), intermediate_size=80)
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight has shape "
                                              r"\(96, 64\), the config .* implies \(80, 64\)"):
        _convert(tmp_path, vila)
    _nothing_left(tmp_path)


def test_key_the_config_does_not_have(tmp_path, vila):
    def add_layer(sd):
        sd["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    _edit_tensors(os.path.join(vila, "llm", "model.safetensors"), add_layer)
    with pytest.raises(ConversionError, match=r"unexpected tensor model\.layers\.2\.self_attn"):
        _convert(tmp_path, vila)
    _nothing_left(tmp_path)


def test_projector_shape_mismatch(tmp_path, vila):
    def shrink(sd):
        sd["layers.4.weight"] = sd["layers.4.weight"][:, :32].contiguous()
    _edit_tensors(os.path.join(vila, "mm_projector", "model.safetensors"), shrink)
    with pytest.raises(ConversionError, match=r"layers\.4\.weight has shape \(64, 32\)"):
        _convert(tmp_path, vila)
    _nothing_left(tmp_path)


@pytest.mark.parametrize("part,changes,msg", [
    ("llm", {"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
     r"unknown language model architecture \['MistralForCausalLM'\]"),
    ("vision_tower", {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model"},
     r"unknown vision tower architecture \['CLIPVisionModel'\]"),
    ("mm_projector", {"mm_projector_type": "mlp_downsample_3x3_fix"},
     r"unknown projector type 'mlp_downsample_3x3_fix'"),
    ("llm", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     r"rope type 'llama3' is not supported"),
    ("llm", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     r"rope type 'yarn' is not supported"),
])
def test_unknown_architecture(tmp_path, vila, part, changes, msg):
    _edit_json(os.path.join(vila, part, "config.json"), **changes)
    with pytest.raises(ConversionError, match=msg):
        _convert(tmp_path, vila)
    _nothing_left(tmp_path)


def test_truncated_weights(tmp_path, vila):
    path = os.path.join(vila, "llm", "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ConversionError, match=r"llm/model\.safetensors: truncated"):
        _convert(tmp_path, vila)
    _nothing_left(tmp_path)


def test_tp_size_must_divide(tmp_path, vila):
    with pytest.raises(ConversionError, match=r"query groups \(2\) is not divisible by the tensor "
                                              r"model parallel size 4"):
        convert_hf_to_megatron(str(tmp_path / "meg"), hf_path=vila, tensor_parallel_size=4)
    _nothing_left(tmp_path)


@pytest.mark.parametrize("build_model", [False, True])
def test_failure_while_writing_leaves_nothing(tmp_path, vila, monkeypatch, build_model):
    """A read error after part of the checkpoint is written: no partial output remains."""
    from megatron_longvila.conversion.hf_io import SafetensorsFolder
    real_get, calls = SafetensorsFolder.get, []

    def failing_get(self, name):
        calls.append(name)
        if len(calls) == 30:
            raise OSError(f"I/O error reading {name}")
        return real_get(self, name)
    monkeypatch.setattr(SafetensorsFolder, "get", failing_get)
    with pytest.raises(OSError, match="I/O error reading"):
        _convert(tmp_path, vila, build_model=build_model)
    assert len(calls) == 30
    _nothing_left(tmp_path)


def test_existing_output_is_kept(tmp_path, vila):
    os.makedirs(tmp_path / "meg")
    (tmp_path / "meg" / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="is not empty"):
        _convert(tmp_path, vila)
    assert (tmp_path / "meg" / "keep.txt").read_text() == "mine"


def test_megatron_side_errors(tmp_path, vila):
    with pytest.raises(ConversionError, match="does not exist"):
        convert_megatron_to_hf(str(tmp_path / "nope"), str(tmp_path / "out"), progress=False)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConversionError, match="latest_checkpointed_iteration.txt"):
        convert_megatron_to_hf(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)
    _convert(tmp_path, vila)
    os.remove(tmp_path / "meg" / "longvila_config.json")
    with pytest.raises(ConversionError, match=r"missing file .*longvila_config\.json"):
        convert_megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "out"), progress=False)
    _nothing_left(tmp_path, "out")


def test_cli_exit_codes_and_summary(tmp_path, vila, capsys):
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def cli(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, "tools", name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.main
    to_meg, to_hf = cli("convert_hf_to_megatron"), cli("convert_megatron_to_hf")
    assert to_meg(["--hf-path", str(tmp_path / "missing"), "--save", str(tmp_path / "meg")]) == 2
    assert "error: HF checkpoint directory" in capsys.readouterr().err
    assert to_meg(["--hf-path", vila, "--save", str(tmp_path / "meg"), "--dtype", "fp32",
                   "--no-progress", "--summary-json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "converted 64 Megatron tensors" in out and "peak RSS" in out
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["tensors"] == 64 and s["written_bytes"] > s["read_bytes"] > 0
    assert to_hf(["--load", str(tmp_path / "meg"), "--save", str(tmp_path / "hf2"),
                  "--dtype", "fp32", "--no-progress"]) == 0
    a = load_file(os.path.join(vila, "llm", "model.safetensors"))
    b = load_file(str(tmp_path / "hf2" / "llm" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_writer(tmp_path):
    path = str(tmp_path / "x.safetensors")
    t = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16)}
    w = StreamingSafetensorsWriter(path, [("a", (3, 5), torch.float32), ("b", (7,), torch.bfloat16)])
    with pytest.raises(ConversionError, match="tensor b came where a was expected"):
        w.write("b", t["b"])
    w.write("a", t["a"])
    with pytest.raises(ConversionError, match=r"b: shape \(8,\), expected \(7,\)"):
        w.write("b", torch.zeros(8))
    w.write("b", t["b"])
    w.close()
    got = load_file(path)
    assert all(torch.equal(got[k], t[k]) for k in t)
    w = StreamingSafetensorsWriter(str(tmp_path / "y.safetensors"), [("a", (1,), torch.float32)])
    with pytest.raises(ConversionError, match=r"never written: \['a'\]"):
        w.close()


# ---------------------------------------------------------------- issue 14: cases 3, 15, 17
def test_output_equal_to_or_inside_the_input_is_refused(tmp_path, vila):
    """Case 3: --save X --load X --overwrite (and HF -> Megatron with --save = --hf-path)
    used to delete the input. Refused now, the input intact."""
    _convert(tmp_path, vila)
    meg = str(tmp_path / "meg")
    before = sorted(os.listdir(meg))
    with pytest.raises(ConversionError, match=r"output .*meg is the input .*meg"):
        convert_megatron_to_hf(meg, meg, overwrite=True, progress=False)
    with pytest.raises(ConversionError, match=r"output .*meg/hf is inside the input .*meg"):
        convert_megatron_to_hf(meg, os.path.join(meg, "hf"), overwrite=True, progress=False)
    assert sorted(os.listdir(meg)) == before
    with pytest.raises(ConversionError, match=r"output .*hf is the input .*hf"):
        convert_hf_to_megatron(vila, hf_path=vila, overwrite=True, in_process=True,
                               progress=False)
    assert os.path.isfile(os.path.join(vila, "llm", "model.safetensors"))
    assert os.path.isfile(os.path.join(meg, "release", "metadata.json"))


def test_stale_staging_dirs_of_dead_conversions_are_removed(tmp_path, vila):
    """Case 17: a SIGKILLed conversion leaves .<save>.tmp-<pid>; the next run into the same
    output removes those of dead processes (and keeps a live one's)."""
    import subprocess
    p = subprocess.Popen(["true"])
    p.wait()
    dead = tmp_path / f".meg.tmp-{p.pid}"
    alive = tmp_path / f".meg.tmp-{os.getppid()}"
    for d in (dead, alive):
        os.makedirs(d / "release")
        (d / "release" / "__0_0.distcp").write_bytes(b"\0" * 1000)
    _convert(tmp_path, vila)
    assert not dead.exists()
    assert alive.exists()
    assert os.path.isfile(tmp_path / "meg" / "latest_checkpointed_iteration.txt")


def test_truncated_megatron_checkpoint_names_the_tensor(tmp_path, vila, capsys):
    """Case 15: Megatron -> HF from a checkpoint whose tensor data is cut short ended in a bare
    EOFError; now one line names the file and the first tensor past the end."""
    _convert(tmp_path, vila)
    f = tmp_path / "meg" / "release" / "__0_0.distcp"
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(ConversionError, match=rf"__0_0\.distcp: truncated at {size // 2} bytes; "
                                              r"tensor language_model\.[\w.]+ .*lie past the end"):
        convert_megatron_to_hf(str(tmp_path / "meg"), str(tmp_path / "out"), progress=False)
    _nothing_left(tmp_path, "out")
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "m2h", os.path.join(root, "tools", "convert_megatron_to_hf.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    capsys.readouterr()
    assert mod.main(["--load", str(tmp_path / "meg"), "--save", str(tmp_path / "out"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated" in err[0] and "tensor language_model." in err[0], err
