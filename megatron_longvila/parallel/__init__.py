"""MM-SP: LongVILA's multi-modal sequence parallelism on Megatron-Core's context-parallel state.

Modules (one concept each):

* :mod:`.groups` - the SP group is Megatron's CP group, split into Ulysses x ring with
  Megatron's hierarchical CP groups (``initialize_mmsp``, ``get_mmsp_groups``);
  ``validate_mmsp_sizes`` and the two flag spellings (``add_mmsp_arguments``,
  ``resolve_mmsp_arguments``).
* :mod:`.layout` - ``SequenceLayout``: where each token of a packed row lives (contiguous
  ``ring_varlen`` or ``zigzag_ring_varlen`` ring shards, Ulysses pieces, padding only where
  the layout needs it) and the varlen attention block between any two ring shards. Torch only.
* :mod:`.attention` - the 2D attention (``attention_2d``): Ulysses all-to-all (GQA aware) and
  ring attention with a true ring backward; kernels: cuDNN / flash varlen on CUDA, exact
  math elsewhere. Torch only. ``varlen_attention`` is the same at SP=1.
* :mod:`.sharding` - per micro-batch: token shards with global positions, balanced frame
  split, the uneven all-to-all route of visual embeddings, ``MMSPPackedSeqParams`` (carries
  the layout to every layer's core attention), ``sp_loss``, ``gather_sequence``.
* :mod:`.mmsp` - ``LongVILAModel``'s forward at SP > 1 and ``sp_prefill_logits`` (inference).
* :mod:`.balance` - ``balance_report``: per-rank visual tokens, LM tokens, attention FLOPs.

Typical use (the trainer does this)::

    initialize_mmsp(tp=..., cp=sp, ring=ring, num_heads=..., num_kv_heads=...)
    model = LongVILAModel(cfg, seq_parallel_ring_type="zigzag_ring_varlen")
    losses = model(tokens, position_ids, frames, labels, cu_seqlens)   # this rank's shard
    loss, _, _ = sp_loss(losses[0], model.mmsp_batch.loss_mask[0], sp_group)
"""
