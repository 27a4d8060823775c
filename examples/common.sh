# Shared by the five stage scripts (sourced, not run).
#
# Environment (all optional):
#   MODEL      tiny (default; CPU) | qwen2-1.5b | qwen2-7b | llama3-8b
#   NPROC      processes on this node (default 1); multi-node: set LAUNCHER to your torchrun line
#   LAUNCHER   e.g. "torchrun --nnodes 8 --nproc-per-node 8 --rdzv-endpoint HOST:PORT"
#   DATA       WebDataset shard directories (Megatron-style weights allowed); default: synthetic
#   TOKENIZER  HF tokenizer directory (required for real models with DATA)
#   LOAD       checkpoint to start from (the previous stage's SAVE, or a converted HF model);
#              loaded as weights only (--finetune). If SAVE already holds a checkpoint of this
#              stage, the run resumes from it instead. LOAD=none: start from scratch.
#   SAVE       output directory (default runs/<stage>); SAVE=none: save nothing
#   TRAIN_ITERS  iterations of the stage (default 20 on tiny; 1000-5000 per stage on real models)
#   PYTHON     the interpreter (default python); OMP_NUM_THREADS defaults to 1
# Read by the stage scripts (GBS, SEQ, FRAMES for real models only, MODEL != tiny; tiny runs use
# fixed small values):
#   GBS        --global-batch-size (stages 1-2: 256, 3: 128, 4-5: 32)
#   SEQ        --seq-length of stages 4-5 (default 65536; stage 4 also sets
#              --max-position-embeddings to it)
#   FRAMES     stage 5: frames per video (--num-frames and --synthetic-frames, default 256)
#   SP, RING   stages 4-5, any model: MM-SP size (--context-parallel-size) and its ring size
#              (--seq-parallel-ring-size); defaults SP 1 (stage 4) or NPROC (stage 5), RING 1;
#              Ulysses size = SP / RING
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=${MODEL:-tiny}
NPROC=${NPROC:-1}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

warmup() {  # warmup ITERS TRAIN_ITERS: the recipe's warmup, at most half of a short run
  local w=$1 t=$2
  (( w > t / 2 )) && w=$(( t / 2 ))
  echo "$w"
}

longvila_run() {  # longvila_run STAGE SAVE_DEFAULT ARGS...
  local stage=$1 save=${SAVE:-$2}; shift 2
  local -a args=(--model "$MODEL" --stage "$stage")
  [[ "$save" != none ]] && args+=(--save "$save")
  [[ -n "${DATA:-}" ]] && args+=(--data-path $DATA)
  [[ -n "${TOKENIZER:-}" ]] && args+=(--tokenizer-model "$TOKENIZER")
  if [[ "$save" != none ]] && { [[ -f "$save/latest_checkpointed_iteration.txt" ]] ||
       compgen -G "$save/iter_*" >/dev/null; }; then
    args+=(--load "$save")                       # resume this stage exactly (iter_* without
                                                 # a tracker: the trainer refuses, naming them)
  elif [[ -n "${LOAD:-}" && "${LOAD}" != none ]]; then
    args+=(--load "$LOAD" --finetune)            # weights of the previous stage
  fi
  [[ "$MODEL" != tiny ]] && args+=(--bf16 --use-distributed-optimizer --transformer-impl auto)
  local -a launch
  if [[ -n "${LAUNCHER:-}" ]]; then
    read -r -a launch <<< "$LAUNCHER"
  elif [[ "$NPROC" == 1 ]]; then
    launch=("$PY")
  else
    launch=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC")
  fi
  echo "+ ${launch[*]} pretrain_longvila.py ${args[*]} $*"
  "${launch[@]}" pretrain_longvila.py "${args[@]}" "$@"
}
