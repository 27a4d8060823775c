"""Hugging Face <-> Megatron-Core conversion (used by tools/convert_*.py).

- ``convert``:        the public entry points (``convert_hf_to_megatron``,
                      ``convert_megatron_to_hf``, ``format_summary``);
- ``hf_to_megatron`` / ``megatron_to_hf``: the two directions;
- ``mapping``:        the declarative parameter rules (names, QKV interleave for GQA, gate/up
                      fusion, tensor-parallel split axis), shared by both directions;
- ``hf_io``:          VILA's folder layout, HF configs <-> LongVILAConfig, lazy safetensors
                      reads and a streaming safetensors writer;
- ``hf_source``:      an HF checkpoint opened and checked up front; the source's dtype;
- ``assets``:         ``SAVE/hf_assets/`` (carried configs, side files, unused HF tensors);
- ``sharded_index``:  where each parameter lives in a dist checkpoint (read off Megatron-Core);
- ``dist_writer``:    a Megatron-Core dist checkpoint written one tensor at a time;
- ``megatron_reader``: full tensors of a dist checkpoint, one at a time;
- ``workers``:        gloo process groups (one rank here, or N spawned ranks; file-store
                      rendezvous);
- ``report``:         progress bar, peak memory, the summary;
- ``tp``:             full tensors <-> tensor-parallel shards of a live model.
"""
