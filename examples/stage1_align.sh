#!/usr/bin/env bash
# LongVILA stage 1, alignment: the projector learns to map vision features into the LLM;
# vision tower and LLM frozen. Image/short-video captions.
#   bash examples/stage1_align.sh [more pretrain_longvila.py flags]     (env: see common.sh)
source "$(dirname "$0")/common.sh"
if [[ "$MODEL" == tiny ]]; then
  ARGS=(--seq-length 256 --global-batch-size 4 --train-iters "${TRAIN_ITERS:-20}" --lr 1e-3
        --lr-warmup-iters 2 --save-interval 10)
else
  ARGS=(--seq-length 4096 --micro-batch-size 1 --global-batch-size "${GBS:-256}"
        --train-iters "${TRAIN_ITERS:-2000}" --lr 1e-3 --min-lr 0
        --lr-warmup-iters "$(warmup 60 "${TRAIN_ITERS:-2000}")"
        --lr-decay-style cosine --weight-decay 0 --clip-grad 1.0 --save-interval 500)
fi
longvila_run align runs/stage1_align "${ARGS[@]}" "$@"
