"""Hugging Face (VILA layout) <-> Megatron-Core dist checkpoint: the two conversions.

The Megatron side is the format of :mod:`megatron_longvila.checkpoint`, what
``pretrain_longvila.py --load`` reads: ``SAVE/latest_checkpointed_iteration.txt``
("release"), ``SAVE/release/`` (a Megatron-Core dist checkpoint of ``{"model":
model.sharded_state_dict()}``) and ``SAVE/longvila_config.json``. Next to them the converter
keeps ``SAVE/hf_assets/`` (:mod:`.assets`): what a Megatron checkpoint has no place for but a
round trip needs.

Both directions write through :func:`megatron_longvila.utils.atomic.atomic_output_dir`: the
output appears whole or not at all, an existing output is replaced only with ``overwrite``,
and an output overlapping the input is refused. ``dtype`` defaults to the source's.

Memory (see tools/benchmarks/bench_convert.py for measurements):

- HF -> Megatron (default, :mod:`.dist_writer`): one process; for each parameter the HF
  tensor(s) are read, mapped and handed to PyTorch DCP's writer just before they are written.
  Peak memory is a few copies of the largest tensor plus a fixed overhead.
- HF -> Megatron with ``build_model=True``: the TP-sharded LongVILAModel is built in
  ``tensor_parallel_size`` gloo processes (:mod:`.workers`) and saved with Megatron-Core's
  ``dist_checkpointing.save``. Peak memory is the model once (spread over the processes).
- Megatron -> HF (:mod:`.megatron_to_hf`): one Megatron tensor at a time, read at full size
  whatever layout saved it (:mod:`.megatron_reader`), streamed into safetensors.
"""

from .hf_to_megatron import convert_hf_to_megatron
from .megatron_to_hf import convert_megatron_to_hf
from .report import format_summary

__all__ = ["convert_hf_to_megatron", "convert_megatron_to_hf", "format_summary"]
