"""MM-SP: LongVILA's multi-modal sequence parallelism on Megatron-Core's context-parallel state.

Layer: orchestration, below ``models`` and above ``kernels`` (see
:mod:`megatron_longvila.kernels` for the whole layering). It plans and moves plain tensors
(token shards, frame ranges, routes, losses) and never imports the model: the model calls it
(``LongVILAModel.forward`` -> :func:`.sharding.shard_micro_batch`) and hands it its tensors.
The attention math it describes (``VarlenBlock`` s) runs in ``kernels``.

Modules (one concept each):

* :mod:`.groups` - the SP group is Megatron's CP group, split into Ulysses x ring with
  Megatron's hierarchical CP groups (``initialize_mmsp``, ``get_mmsp_groups``);
  ``validate_mmsp_sizes`` and the two flag spellings (``add_mmsp_arguments``,
  ``resolve_mmsp_arguments``).
* :mod:`.layout` - ``SequenceLayout``: where each token of a packed row lives (contiguous
  ``ring_varlen`` or ``zigzag_ring_varlen`` ring shards, Ulysses pieces, padding only where
  the layout needs it) and the varlen attention block between any two ring shards. Torch only.
* :mod:`.sharding` - per micro-batch: ``shard_micro_batch`` (this rank's ``BatchShard``; SP=1
  is the trivial one), token shards with global positions, balanced frame split, the uneven
  all-to-all route of visual embeddings, ``MMSPPackedSeqParams`` (carries the layout's
  attention blocks to every layer's core attention), ``sp_loss``, ``gather_sequence`` /
  ``select_rows`` (outputs back in input order).
* :mod:`.balance` - ``balance_report``: per-rank visual tokens, LM tokens, attention FLOPs.

Typical use (the trainer does this)::

    initialize_mmsp(tp=..., cp=sp, ring=ring, num_heads=..., num_kv_heads=...)
    model = LongVILAModel(cfg, seq_parallel_ring_type="zigzag_ring_varlen")
    out = model(tokens, position_ids, frames, labels, cu_seqlens)   # this rank's shard
    loss, _, _ = sp_loss(out.output[0], out.loss_mask[0], sp_group)
"""
