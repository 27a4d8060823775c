"""Hugging Face <-> Megatron-Core conversion (used by tools/convert_*.py).

- ``mapping``:     the declarative parameter rules (names, QKV interleave for GQA, gate/up
                   fusion, tensor-parallel split axis), shared by both directions;
- ``hf_io``:       VILA's folder layout, HF configs <-> LongVILAConfig, lazy safetensors
                   reads and a streaming safetensors writer;
- ``dist_writer``: a Megatron-Core dist checkpoint written one tensor at a time;
- ``convert``:     the two conversions (``convert_hf_to_megatron``, ``convert_megatron_to_hf``);
- ``tp``:          full tensors <-> tensor-parallel shards of a live model.
"""
