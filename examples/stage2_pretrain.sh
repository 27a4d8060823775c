#!/usr/bin/env bash
# LongVILA stage 2, pre-training: projector + LLM on interleaved / captioned image and video
# data; vision tower frozen. LOAD: stage 1's output.
source "$(dirname "$0")/common.sh"
if [[ "$MODEL" == tiny ]]; then
  ARGS=(--seq-length 256 --global-batch-size 4 --train-iters "${TRAIN_ITERS:-20}" --lr 5e-4
        --lr-warmup-iters 2 --save-interval 10)
else
  ARGS=(--seq-length 4096 --micro-batch-size 1 --global-batch-size "${GBS:-256}"
        --train-iters "${TRAIN_ITERS:-5000}" --lr 5e-5 --min-lr 0
        --lr-warmup-iters "$(warmup 150 "${TRAIN_ITERS:-5000}")"
        --lr-decay-style cosine --weight-decay 0 --clip-grad 1.0 --save-interval 500)
fi
LOAD=${LOAD:-runs/stage1_align} longvila_run pretrain runs/stage2_pretrain "${ARGS[@]}" "$@"
