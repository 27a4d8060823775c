#!/usr/bin/env bash
# LongVILA stage 4, context extension: the LLM alone continues pre-training on long text with
# a larger RoPE base (vision tower and projector frozen). LOAD: stage 3's output.
# The new RoPE base is stored in this stage's longvila_config.json, so stage 5 inherits it.
# Real models: SP=ring/Ulysses sizes via SP / RING (e.g. SP=8 RING=2 for 262k tokens on 8 GPUs).
source "$(dirname "$0")/common.sh"
SP=${SP:-1}
RING=${RING:-1}
if [[ "$MODEL" == tiny ]]; then
  ARGS=(--seq-length 512 --global-batch-size 2 --train-iters "${TRAIN_ITERS:-20}" --lr 5e-4
        --lr-warmup-iters 2 --rotary-base 100000 --max-position-embeddings 8192
        --synthetic-text-only --save-interval 10)
else
  ARGS=(--seq-length "${SEQ:-65536}" --micro-batch-size 1 --global-batch-size "${GBS:-32}"
        --train-iters "${TRAIN_ITERS:-1000}" --lr 2e-5 --min-lr 0
        --lr-warmup-iters "$(warmup 30 "${TRAIN_ITERS:-1000}")"
        --lr-decay-style cosine --weight-decay 0 --clip-grad 1.0 --rotary-base 5000000
        --max-position-embeddings "${SEQ:-65536}" --recompute-granularity full
        --synthetic-text-only --save-interval 200)
fi
LOAD=${LOAD:-runs/stage3_short_sft} longvila_run context-extension runs/stage4_context_ext \
  --context-parallel-size "$SP" --seq-parallel-ring-size "$RING" "${ARGS[@]}" "$@"
