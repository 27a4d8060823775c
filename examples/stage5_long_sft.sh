#!/usr/bin/env bash
# LongVILA stage 5, long supervised fine-tuning: everything trains on long videos (many frames)
# with MM-SP: each sequence is shared by SP ranks (SP/RING: Ulysses = SP/RING x ring = RING,
# zigzag ring attention). LOAD: stage 4's output.
#   CPU:  NPROC=2 bash examples/stage5_long_sft.sh                       (tiny, SP=2)
#   GPU:  NPROC=8 SP=8 RING=2 MODEL=qwen2-7b DATA=... TOKENIZER=... LOAD=... bash examples/stage5_long_sft.sh
source "$(dirname "$0")/common.sh"
SP=${SP:-$NPROC}
RING=${RING:-1}
if [[ "$MODEL" == tiny ]]; then
  ARGS=(--seq-length 512 --global-batch-size 2 --train-iters "${TRAIN_ITERS:-20}" --lr 5e-4
        --lr-warmup-iters 2 --synthetic-frames 16 --synthetic-videos 32 --save-interval 10)
else
  ARGS=(--seq-length "${SEQ:-65536}" --micro-batch-size 1 --global-batch-size "${GBS:-32}"
        --train-iters "${TRAIN_ITERS:-1000}" --lr 2e-5 --min-lr 0
        --lr-warmup-iters "$(warmup 30 "${TRAIN_ITERS:-1000}")"
        --lr-decay-style cosine --weight-decay 0 --clip-grad 1.0 --num-frames "${FRAMES:-256}"
        --synthetic-frames "${FRAMES:-256}" --synthetic-videos 64 --recompute-granularity full
        --save-interval 200)
  # SEQ needs the positions stage 4 raised (with its RoPE base), stored in the longvila_config.json
  # of the checkpoint this stage starts from; without one (LOAD=none, no stage 4 run), raise them
  # here as stage 4 does, so the default SEQ fits every preset.
  if [[ ! -f "${SAVE:-runs/stage5_long_sft}/longvila_config.json" &&
        ! -f "${LOAD:-runs/stage4_context_ext}/longvila_config.json" ]]; then
    ARGS+=(--rotary-base 5000000 --max-position-embeddings "${SEQ:-65536}")
  fi
fi
LOAD=${LOAD:-runs/stage4_context_ext} longvila_run long-sft runs/stage5_long_sft \
  --context-parallel-size "$SP" --seq-parallel-ring-size "$RING" --seq-parallel-ring-type zigzag_ring_varlen \
  "${ARGS[@]}" "$@"
