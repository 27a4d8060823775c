"""Pixels as VILA feeds them to the vision tower: our transform (and the loader's frames, through
preprocessing and PNG shards) equal transformers' SiglipImageProcessor on the same image,
prepared the way VILA's ``process_image`` prepares it for the checkpoint's image_aspect_ratio.
The processors are built from local preprocessor_config.json files (no download)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_longvila.data import build_train_loader, preprocess
from megatron_longvila.data.image_transform import ImageTransform
from megatron_longvila.data.video import resize_frame

S = 28
SHAPES = [(40, 56), (56, 40), (28, 28), (17, 90), (100, 33)]


def siglip_processor(folder, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    from transformers import SiglipImageProcessor
    SiglipImageProcessor(size={"height": S, "width": S}, image_mean=list(mean),
                         image_std=list(std)).save_pretrained(str(folder))
    from transformers import AutoImageProcessor
    return AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)


def images(seed=0):
    g = np.random.default_rng(seed)
    out = []
    for h, w in SHAPES:  # smooth content plus noise: resampling matters
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)),
                         ((x + y) * 7) % 256], -1)
        out.append(np.clip(base + g.integers(-30, 30, (h, w, 3)), 0, 255).astype(np.uint8))
    return out


def vila_pixels(proc, img, aspect):
    """VILA's process_image for a SigLIP tower: resize -> PIL resize to the processor size
    (Pillow's default filter) then the processor; pad -> expand to a square with the mean
    colour, then the processor; anything else -> the processor alone."""
    pil = Image.fromarray(img)
    size = (proc.size["width"], proc.size["height"])
    if aspect == "resize":
        pil = pil.resize(size)
    elif aspect == "pad":
        w, h = pil.size
        fill = tuple(int(x * 255) for x in proc.image_mean)
        if w > h:
            sq = Image.new(pil.mode, (w, w), fill)
            sq.paste(pil, (0, (w - h) // 2))
            pil = sq
        elif h > w:
            sq = Image.new(pil.mode, (h, h), fill)
            sq.paste(pil, ((h - w) // 2, 0))
            pil = sq
    return proc(images=pil, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("aspect", ["resize", "pad", None])
@pytest.mark.parametrize("stats", [((0.5,) * 3, (0.5,) * 3),
                                   ((0.48145466, 0.4578275, 0.40821073),
                                    (0.26862954, 0.26130258, 0.27577711))])
def test_transform_equals_siglip_processor(tmp_path, aspect, stats):
    proc = siglip_processor(tmp_path, *stats)
    t = ImageTransform.from_preprocessor_config(str(tmp_path), aspect)
    assert t.mode == (aspect or "resize")  # SigLIP's own default is a plain resize
    imgs = images()
    ours = t(imgs)
    for k, img in enumerate(imgs):
        want = vila_pixels(proc, img, aspect)
        assert ours[k].dtype == want.dtype == torch.float32
        assert torch.equal(ours[k], want), (aspect, img.shape, (ours[k] - want).abs().max())


def test_crop_on_request_and_checkpoint_config(tmp_path):
    siglip_processor(tmp_path / "vision_tower")
    (tmp_path / "config.json").write_text(json.dumps({"image_aspect_ratio": "resize"}))
    t = ImageTransform.from_hf_checkpoint(str(tmp_path))
    assert (t.size, t.mode) == (S, "resize")
    assert ImageTransform.from_hf_checkpoint(str(tmp_path), "pad").mode == "pad"
    crop = ImageTransform(S, "crop")
    img = images()[0]
    want = torch.from_numpy(resize_frame(img, S, "crop")).permute(2, 0, 1)[None]
    assert torch.equal(crop([img]), t.normalize(want.contiguous()))
    # resize_frame's default is VILA's resize now
    assert np.array_equal(resize_frame(img, S), t.geometry(img))
    with pytest.raises(ValueError, match="square size"):
        ImageTransform.from_preprocessor_config({"size": {"height": 28, "width": 30}})
    with pytest.raises(ValueError, match="cannot read the image processor config"):
        ImageTransform.from_preprocessor_config(str(tmp_path / "nope"))


def test_loader_frames_equal_processor(tmp_path):
    """Images -> preprocess (PNG shards, the checkpoint's resize) -> loader: the micro-batch's
    frames are exactly what the processor gives for the original images."""
    proc = siglip_processor(tmp_path / "vt")
    imgs = images(3)
    ann = []
    for k, img in enumerate(imgs):
        p = tmp_path / f"im{k}.png"
        Image.fromarray(img).save(p)
        ann.append({"image": str(p), "id": f"i{k}",
                    "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                      {"from": "gpt", "value": "A test."}]})
    (tmp_path / "a.json").write_text(json.dumps(ann))
    t = ImageTransform.from_preprocessor_config(str(tmp_path / "vt"), "resize")
    preprocess(str(tmp_path / "a.json"), str(tmp_path / "wds"), image_size=t.size,
               resize_mode=t.mode, image_format="png", progress=False)
    loader = build_train_loader(str(tmp_path / "wds"), "tiny", seq_length=300, image_size=S,
                                num_workers=0, epochs=1, shuffle=False)
    seen = 0
    for batch in loader:
        for key, f in zip(batch["sample_keys"], batch["frames"]):
            k = int(key[1:])
            assert torch.equal(f, vila_pixels(proc, imgs[k], "resize")), key
            seen += 1
    assert seen == len(imgs)
