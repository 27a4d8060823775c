"""A tiny VILA-layout checkpoint, converted to Megatron and fine-tuned here for a few steps: the
first step's loss equals transformers' loss on the same sample prepared the upstream way
(VILA's chat formatting and label rule through the tokenizer's own template, pixels from
SiglipImageProcessor after VILA's resize), computed with the HF reference model."""

import dataclasses
import json
import os

import numpy as np
import torch
from PIL import Image

from megatron_longvila.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from megatron_longvila.conversion.convert import convert_hf_to_megatron
from megatron_longvila.data import preprocess

from modelutil import hf_modules, tiny_config
from test_convert import write_vila
from test_data_image_transform import vila_pixels
from test_data_vila_format import QWEN2_JINJA, reference, train_tokenizer
from trainutil import run_cli, train_records


def test_converted_checkpoint_first_step_loss_equals_transformers(tmp_path):
    cfg = tiny_config("qwen2", "mlp_downsample")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=448))
    lm, vt, proj = hf_modules(cfg, seed=11)
    hf = write_vila(str(tmp_path / "hf"), cfg, lm, vt, proj, tokenizer=False)
    tok_dir = train_tokenizer(os.path.join(hf, "llm"), ["<|endoftext|>", "<|im_start|>",
                                                        "<|im_end|>"],
                              eos="<|im_end|>", jinja=QWEN2_JINJA)
    meg = str(tmp_path / "meg")
    convert_hf_to_megatron(meg, hf_path=hf, dtype="fp32", in_process=True, progress=False)

    # one image sample, an odd-shaped picture (VILA resizes it to the tower's size)
    g = np.random.default_rng(0)
    img = g.integers(0, 256, (37, 52, 3)).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    conv = [{"from": "human", "value": "<image>\nWhich colour is the shape?"},
            {"from": "gpt", "value": "The shape is red."}]
    (tmp_path / "a.json").write_text(json.dumps([{"image": str(tmp_path / "a.png"),
                                                  "conversations": conv}]))
    S = cfg.vision.image_size
    preprocess(str(tmp_path / "a.json"), str(tmp_path / "wds"), image_size=S,
               resize_mode="resize", image_format="png", progress=False)
    metrics = tmp_path / "m.jsonl"
    run_cli(["--load", meg, "--finetune", "--data-path", tmp_path / "wds",
             "--tokenizer-model", tok_dir, "--seq-length", 128, "--micro-batch-size", 1,
             "--global-batch-size", 1, "--train-iters", 3, "--lr", 1e-3, "--seed", 3,
             "--num-workers", 0, "--metrics-file", metrics, "--log-sample-keys"])
    recs = train_records(metrics)
    assert [r["iteration"] for r in recs] == [1, 2, 3]

    # the upstream way: ids + labels from VILA's rules, pixels from the image processor
    ids, tgt = reference(tok_dir, None, conv, 1)
    T = cfg.tokens_per_frame
    ids_x = [i for i in ids for _ in range(T if i == IMAGE_TOKEN_INDEX else 1)]
    tgt_x = [t for i, t in zip(ids, tgt) for _ in range(T if i == IMAGE_TOKEN_INDEX else 1)]
    from transformers import AutoImageProcessor
    proc = AutoImageProcessor.from_pretrained(os.path.join(hf, "vision_tower"), local_files_only=True)
    pixels = vila_pixels(proc, img, "resize")[None]
    from megatron_longvila.evaluation.hf_reference import HFLongVILA
    ref = HFLongVILA.from_pretrained(hf)
    tokens = torch.tensor(ids_x)[None]
    with torch.no_grad():
        logits = ref(tokens, torch.arange(len(ids_x))[None], frames=pixels).output[0].double()
    labels = torch.tensor([ids_x[k + 1] if tgt_x[k + 1] else IGNORE_INDEX
                           for k in range(len(ids_x) - 1)])
    want = torch.nn.functional.cross_entropy(logits[:-1], labels, ignore_index=IGNORE_INDEX)
    assert abs(recs[0]["loss"] - want.item()) < 2e-5 * max(1.0, want.item()), (recs[0]["loss"], want.item())
    assert recs[-1]["loss"] < recs[0]["loss"]  # and it trains
