#!/usr/bin/env bash
# The tiny LongVILA learns a video needle-in-a-haystack task on a CPU, in minutes, with MM-SP.
#
#   bash examples/needle_showcase.sh [OUT_DIR]        (default OUT_DIR: ./needle_showcase)
#
# 1. data   real mp4s (PyAV): 768 training videos of 1..16 plain grey frames, one frame with a
#           coloured square (6 colours: chance 1/6); preprocessed into WebDataset shards keeping
#           every frame. A held-out haystack video (64 frames) and 12 held-out needle images.
# 2. train  the tiny preset with the project's trainer, 2 ranks sharing each sequence (SP=2).
# 3. eval   V-NIAH at SP=2: frames {2,4,8,16} (within training lengths) and {32,64} (beyond),
#           depths 0..100%; results JSON + heatmap PNG.
# 4. checks the same evaluation at SP=1 gives the same answers; the checkpoint converted to
#           Hugging Face gives the same answers through transformers (on frames {8,64}: the
#           transformers loop is slower) and, converted back to Megatron, on the whole grid.
#           The 64-frame cells hold wrong answers too, so "same answers" is not just "all
#           correct". SKIP_CHECKS=1 skips them.
#
# Environment: PYTHON (default python), NPROC (default 2), TRAIN_ITERS (default 1200).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-./needle_showcase}
PY=${PYTHON:-python}
NPROC=${NPROC:-2}
ITERS=${TRAIN_ITERS:-1200}
RUN="$PY -m torch.distributed.run --standalone --nproc-per-node $NPROC"
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=1
mkdir -p "$OUT"
t0=$(date +%s)
stamp() { echo "[needle showcase] $(( $(date +%s) - t0 ))s: $*"; }

EVAL_ARGS=(--haystack "$OUT/data/eval/haystack.mp4" --needles "$OUT/data/eval/needles.json"
           --frame-counts 2,4,8,16,32,64 --depths 0,0.25,0.5,0.75,1 --match exact)

stamp "1/4 data"
$PY tools/make_synthetic_videos.py --out "$OUT/data" --needle --shards --needle-eval-set \
    --num-videos 768 --min-frames 1 --frames-per-video 16 --width 64 --image-size 32 --seed 0

stamp "2/4 train (tiny, SP=$NPROC, $ITERS iterations)"
rm -rf "$OUT/ckpt"
$RUN pretrain_longvila.py --model tiny --data-path "$OUT/data/wds" \
    --context-parallel-size "$NPROC" --seq-length 256 --micro-batch-size 2 --global-batch-size 2 \
    --train-iters "$ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 30 --adam-beta2 0.95 \
    --num-workers 1 --log-interval 100 --save "$OUT/ckpt" --save-interval "$ITERS" \
    --metrics-file "$OUT/metrics.jsonl" 2>&1 | grep -v -i warn

stamp "3/4 needle-in-a-haystack eval (SP=$NPROC)"
$RUN tools/eval_needle.py --load "$OUT/ckpt" "${EVAL_ARGS[@]}" --context-parallel-size "$NPROC" \
    --overwrite --output "$OUT/niah_sp$NPROC.json" --heatmap "$OUT/niah.png" 2>&1 | grep -v -i warn

if [ "${SKIP_CHECKS:-0}" != 1 ]; then
  stamp "4/4 checks: SP=1 eval, HF round trip"
  $PY tools/eval_needle.py --load "$OUT/ckpt" "${EVAL_ARGS[@]}" --overwrite \
      --output "$OUT/niah_sp1.json" 2>&1 | grep -v -i warn | tail -1
  $PY -m megatron_longvila.evaluation.needle compare "$OUT/niah_sp$NPROC.json" "$OUT/niah_sp1.json"
  rm -rf "$OUT/hf" "$OUT/ckpt_from_hf"
  $PY tools/convert_megatron_to_hf.py --load "$OUT/ckpt" --save "$OUT/hf" --dtype fp32 >/dev/null 2>&1
  $PY tools/convert_hf_to_megatron.py --hf-path "$OUT/hf" --save "$OUT/ckpt_from_hf" --dtype fp32 >/dev/null 2>&1
  $PY tools/eval_needle.py --hf "$OUT/hf" "${EVAL_ARGS[@]}" --frame-counts 8,64 --depths 0,0.5,1 \
      --overwrite --output "$OUT/niah_transformers.json" 2>&1 | grep -v -i warn | tail -1
  $PY -m megatron_longvila.evaluation.needle compare --common-only "$OUT/niah_sp$NPROC.json" \
      "$OUT/niah_transformers.json"
  $RUN tools/eval_needle.py --load "$OUT/ckpt_from_hf" "${EVAL_ARGS[@]}" --context-parallel-size "$NPROC" --overwrite \
      --output "$OUT/niah_hf_roundtrip.json" 2>&1 | grep -v -i warn | tail -1
  $PY -m megatron_longvila.evaluation.needle compare "$OUT/niah_sp$NPROC.json" "$OUT/niah_hf_roundtrip.json"
fi

$PY - "$OUT/niah_sp$NPROC.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
def acc(cells):
    k = sum(c["correct"] for c in cells); n = sum(c["total"] for c in cells)
    return f"{k}/{n} = {k / n:.3f}"
cells = r["cells"]
print("within training lengths (<=16 frames):", acc([c for c in cells if c["frames"] <= 16]))
print("beyond training lengths (32, 64 frames):", acc([c for c in cells if c["frames"] > 16]))
print("chance: 1/6 = 0.167")
EOF
stamp "done: heatmap $OUT/niah.png"
