#!/usr/bin/env bash
# LongVILA stage 3, short supervised fine-tuning: everything trains (vision tower, projector,
# LLM) on short-video and image instruction data. LOAD: stage 2's output.
source "$(dirname "$0")/common.sh"
if [[ "$MODEL" == tiny ]]; then
  ARGS=(--seq-length 256 --global-batch-size 4 --train-iters "${TRAIN_ITERS:-20}" --lr 1e-3
        --lr-warmup-iters 2 --save-interval 10)
else
  ARGS=(--seq-length 8192 --micro-batch-size 1 --global-batch-size "${GBS:-128}"
        --train-iters "${TRAIN_ITERS:-5000}" --lr 2e-5 --min-lr 0
        --lr-warmup-iters "$(warmup 150 "${TRAIN_ITERS:-5000}")"
        --lr-decay-style cosine --weight-decay 0 --clip-grad 1.0 --num-frames 8
        --recompute-granularity full --save-interval 500)
fi
LOAD=${LOAD:-runs/stage2_pretrain} longvila_run sft runs/stage3_short_sft "${ARGS[@]}" "$@"
