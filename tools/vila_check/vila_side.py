"""The VILA side of the upstream check: run NVlabs/VILA's own model code on an exported model.

Runs in VILA's virtualenv (transformers 4.46 and VILA's other pins; see README.md), with
VILA's source tree on PYTHONPATH (its ``llava`` package is imported from there, unmodified).
Started by check_upstream.py; not part of the megatron_longvila package.

For each prompt (an image, a video) it does what VILA's ``generate_content`` does, minus the
two CUDA-only steps (``.cuda()``, ``.half()``): ``extract_media`` (video frames read by VILA's
own loader, ``config.num_video_frames`` of them), ``process_images`` with the checkpoint's
``image_aspect_ratio``, ``tokenize_conversation`` (the tokenizer's chat template), then the
model's ``forward`` (logits of every position) and ``generate`` (greedy).

CPU-only stand-ins, so that VILA's imports succeed on a machine without CUDA (none of them is
on the compared path): the CUDA build of torchvision from PyPI gets its custom-op names
declared (its Python transforms are what VILA uses); ``flash_attn``, ``triton`` and
``s2wrapper`` are empty modules; SigLIP is loaded with eager attention instead of
flash_attention_2.
"""

import argparse
import importlib.abc
import importlib.machinery
import json
import logging
import sys
import types

import torch

# --------------------------------------------------------------------------- CPU stand-ins
_TV = torch.library.Library("torchvision", "DEF")
for _op in ("roi_align", "_roi_align_backward", "ps_roi_align", "_ps_roi_align_backward",
            "roi_pool", "_roi_pool_backward", "ps_roi_pool", "_ps_roi_pool_backward", "nms",
            "qnms", "qroi_align", "deform_conv2d", "_deform_conv2d_backward"):
    _TV.define(f"{_op}(Tensor x) -> Tensor")

CUDA_ONLY = ("flash_attn", "triton", "s2wrapper")


class _Absent:
    """Any attribute or call of a CUDA-only module imported but never used here."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self._name}.{attr}")

    def __call__(self, *a, **k):
        return _Absent(f"{self._name}()")

    def __getitem__(self, k):
        return _Absent(f"{self._name}[]")

    def __mro_entries__(self, bases):
        return (object,)


class _AbsentModule(types.ModuleType):
    __path__ = []
    __version__ = "0.0"

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self.__name__}.{attr}")


class _AbsentFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in CUDA_ONLY:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _AbsentModule(spec.name)

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _AbsentFinder())


def _eager_siglip():
    """VILA's SigLIP (llava/model/multimodal_encoder/siglip) asks for flash_attention_2."""
    from llava.model.multimodal_encoder import siglip
    cls = siglip.SiglipVisionModel
    orig = cls.from_pretrained.__func__

    def from_pretrained(klass, *a, **k):
        if k.get("attn_implementation") == "flash_attention_2":
            k["attn_implementation"] = "eager"
        return orig(klass, *a, **k)

    cls.from_pretrained = classmethod(from_pretrained)


# --------------------------------------------------------------------------- the check
class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--video", required=True)
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--out", required=True, help="output prefix (.json and .safetensors)")
    args = p.parse_args()

    import PIL.Image
    import transformers
    from collections import defaultdict
    from safetensors.torch import save_file

    from llava.media import Video
    from llava.mm_utils import process_images
    from llava.model.language_model.llava_llama import LlavaLlamaModel
    from llava.utils.media import extract_media
    from llava.utils.tokenizer import tokenize_conversation
    _eager_siglip()

    warn = _Warnings()
    transformers.logging.get_logger().addHandler(warn)
    # 1. VILA's from_pretrained loads the export as it is (it runs in fp16: LlavaConfig drops
    #    the config's model_dtype).
    loaded = LlavaLlamaModel.from_pretrained(args.model)
    from_pretrained = {"llm_dtype": str(loaded.llm.dtype),
                       "rope_theta": float(loaded.llm.config.rope_theta),
                       "projector_type": loaded.mm_projector.config.mm_projector_type}
    del loaded
    # 2. VILA's builder (llava.model.builder.load_pretrained_model) for the comparison, in fp32
    #    where the builder forces fp16: its steps, in its order.
    config = transformers.AutoConfig.from_pretrained(args.model)
    config.resume_path = args.model
    config.model_dtype = str(torch.float32)
    model = LlavaLlamaModel(config=config, low_cpu_mem_usage=True).eval()
    model.resize_token_embeddings(len(model.tokenizer))
    not_loaded = [m for m in warn.messages if "newly initialized" in m or "not used when" in m]
    report = {"transformers": transformers.__version__, "torch": torch.__version__,
              "from_pretrained": from_pretrained, "vocab": len(model.tokenizer),
              "rope_theta": float(model.llm.config.rope_theta),
              "llm_inv_freq": model.llm.model.rotary_emb.inv_freq.tolist(),
              "weights_not_loaded_warnings": not_loaded,
              "model_dtype": str(model.llm.dtype),
              "image_aspect_ratio": model.config.image_aspect_ratio,
              "num_video_frames": model.config.num_video_frames, "prompts": {}}
    tensors = {}
    prompts = {"image": [PIL.Image.open(args.image), args.question],
               "video": [Video(args.video), args.question]}
    for kind, value in prompts.items():
        conversation = [{"from": "human", "value": value}]
        media = extract_media(conversation, config=model.config)
        images = process_images(media["image"], model.vision_tower.image_processor, model.config)
        images = images.to(model.llm.dtype)
        media = {"image": [im for im in images]}
        input_ids = tokenize_conversation(conversation, model.tokenizer,
                                          add_generation_prompt=True).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=input_ids, media=media,
                           media_config=defaultdict(dict)).logits[0].float()
            gen = model.generate(input_ids=input_ids, media=media, media_config=defaultdict(dict),
                                 max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.max_new_tokens, do_sample=False)
        tensors[f"{kind}.logits"] = logits.contiguous()
        tensors[f"{kind}.pixels"] = images.float().contiguous()
        report["prompts"][kind] = {"input_ids": input_ids[0].tolist(),
                                   "frames": int(images.shape[0]),
                                   "positions": int(logits.shape[0]),
                                   "greedy": gen[0].tolist()}
    save_file(tensors, args.out + ".safetensors")
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k not in ("llm_inv_freq",)}))


if __name__ == "__main__":
    main()
