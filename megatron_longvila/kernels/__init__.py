"""Kernels: the attention math that the model runs, on plain tensors.

Layering of the library (an import goes downward only; nothing imports a package above it,
no import circle; function-local imports only for optional dependencies)::

    training, evaluation, conversion      entry-point logic (loop, generation, converters)
    models                                LongVILAModel: vision tower, projector, GPTModel;
                                          its forward plans the batch with ``parallel``
    parallel                              MM-SP orchestration: groups, layout, sharding of
                                          tokens and frames, routing, loss reduction
    kernels                               attention: varlen blocks, ring / Ulysses / 2D
    constants, cpu_compat                 shared constants, CPU shims

``kernels`` imports only torch (and its distributed package): no model, no layout, no
Megatron state. The model's core attention calls it directly; the layout (``parallel``)
describes its attention as :class:`~megatron_longvila.kernels.attention.VarlenBlock` s.

* :mod:`.attention` - ``VarlenBlock``, ``block_forward`` / ``block_backward`` (cuDNN / flash
  varlen on CUDA, CPU flash, exact math), ``ring_attention`` (log-sum-exp merge, ring
  backward), ``all_to_all`` (Ulysses), ``attention_2d`` (Ulysses x ring), ``varlen_attention``,
  ``partial_attention`` / ``merge_partials`` (decoding against a sharded KV cache).
"""
