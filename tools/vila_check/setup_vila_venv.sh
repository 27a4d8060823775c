#!/usr/bin/env bash
# VILA's virtualenv for tools/vila_check (CPU): transformers 4.46 (VILA's pin) and the packages
# VILA's llava/ imports. torch is the CPU wheel (2.13.0); PyPI's torchvision for it is a CUDA
# build whose custom ops cannot load here: vila_side.py declares their names (never called).
# VILA's own pins that have no CPU wheel or no Python 3.11 build are left at compatible versions.
set -euo pipefail
VENV=${VILA_VENV:-/work/vila-venv}
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 torchvision "transformers==4.46.0" "accelerate==0.34.2" \
  "einops==0.6.1" einops-exts "timm==0.9.12" hydra-core "pydantic<2,>=1" loguru \
  opencv-python-headless pillow sentencepiece peft safetensors scipy matplotlib pyyaml requests \
  "datasets==2.16.1" "ps3-torch==0.1.3"
"$VENV/bin/pip" install -q --no-build-isolation "deepspeed==0.9.5"
"$VENV/bin/pip" install -q "numpy==1.26.4" "pandas<2.3" "pyarrow<18"   # VILA's numpy pin
