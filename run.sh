#!/usr/bin/env bash
# The whole pipeline on the built-in bilingual corpus: tokenizer → shards → pretrain → eval → LoRA SFT (merged)
# → GPTQ → eval → GGUF, then a summary table. Minutes on a CPU (cpu-demo model); real sizes on GPUs.
#
#   bash run.sh                       # everything, skipping stages whose output is already there
#   bash run.sh --from sft            # redo sft and every stage after it
#   bash run.sh --only eval           # one stage
#   bash run.sh --config 25M --gpus 4 # a GPU-sized model on 4 GPUs (configs/pretrain/<config>.yaml)
#   bash run.sh --out /tmp/demo       # put data/ and runs/ under another directory
#   bash run.sh --print-plan          # print the GPUs, config and launch command it would use, run nothing
#   bash run.sh --precision bf16      # train in bf16 mixed precision (default auto: the config's; fp32 on a CPU)
#   CUDA_VISIBLE_DEVICES=1,3 bash run.sh   # only GPUs 1 and 3
set -euo pipefail
cd "$(dirname "$0")"

STAGES=(setup tokenizer data pretrain eval sft quantize eval_quant gguf summary)
usage() {
  echo "usage: bash run.sh [--from STAGE] [--only STAGE] [--config NAME] [--out DIR] [--gpus N] [--precision P] [--print-plan]"
  echo "stages: ${STAGES[*]}"
}
FROM=""; ONLY=""; CONFIG=""; OUT="."; GPUS=""; PLAN=""; PRECISION=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --precision) PRECISION=$2; shift 2 ;;
    --print-plan) PLAN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $PRECISION =~ ^(auto|bf16|fp32|fp16)$ ]] || { echo "error: --precision $PRECISION: use auto, bf16, fp32 or fp16" >&2; exit 2; }
for s in "$FROM" "$ONLY"; do
  if [ -n "$s" ] && [[ ! " ${STAGES[*]} " =~ " $s " ]]; then echo "error: unknown stage '$s'" >&2; usage >&2; exit 2; fi
done

# GPUs: the ones CUDA_VISIBLE_DEVICES names when it is set, else all that nvidia-smi lists; --gpus N takes the
# first N. None → the cpu-demo model in one process. DeepSpeed's launcher drops CUDA_VISIBLE_DEVICES whenever
# --num_gpus is given, so chosen GPUs are passed as --include localhost:<ids> (ids as nvidia-smi numbers them).
[ -z "$GPUS" ] || [[ $GPUS =~ ^[0-9]+$ ]] || { echo "error: --gpus $GPUS: expected a number" >&2; exit 2; }
IDS=()
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  IFS=, read -ra entries <<< "$CUDA_VISIBLE_DEVICES"
  for id in "${entries[@]}"; do
    id=${id// /}
    if [[ $id =~ ^[0-9]+$ ]]; then IDS+=("$id")
    elif [[ $id =~ ^- ]]; then break  # CUDA stops at the first invalid index ("-1" hides every GPU)
    else
      echo "error: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: '$id' is not a GPU index —" \
        "DeepSpeed's launcher needs indices as nvidia-smi -L numbers them (e.g. CUDA_VISIBLE_DEVICES=1,3)" >&2
      exit 2
    fi
  done
  if [ -n "$GPUS" ]; then
    if [ "$GPUS" -gt "${#IDS[@]}" ]; then
      echo "error: --gpus $GPUS but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES names ${#IDS[@]}" >&2; exit 2
    fi
    IDS=("${IDS[@]:0:$GPUS}")
  fi
  GPUS=${#IDS[@]}
elif [ -z "$GPUS" ]; then
  GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
fi
if [ -z "$CONFIG" ]; then
  if [ "$GPUS" -gt 0 ]; then CONFIG=25M; else CONFIG=cpu-demo; fi
fi
[ -f "configs/pretrain/$CONFIG.yaml" ] || { echo "error: configs/pretrain/$CONFIG.yaml not found (try: $(ls configs/pretrain | sed 's/.yaml//' | tr '\n' ' '))" >&2; exit 2; }

PY=.venv/bin/python
DATA=$OUT/data; RUNS=$OUT/runs
TOK=$DATA/tokenizer/tokenizer.model
BASE=$RUNS/$CONFIG; SFT=$RUNS/$CONFIG-sft; QUANT=$RUNS/$CONFIG-sft-gptq; GGUF=$RUNS/$CONFIG-sft.gguf
TIMES=$RUNS/pipeline-times.tsv
VOCAB=$([ "$CONFIG" = cpu-demo ] && echo 4096 || echo 8000)
RANKS=$(( GPUS > 0 ? GPUS : 1 ))  # processes sharing the cores
THREADS=$(( $(nproc) / RANKS > 0 ? $(nproc) / RANKS : 1 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS} TOKENIZERS_PARALLELISM=false

# Training precision: the config's unless --precision says otherwise (weights are then saved in fp32). bf16 on a CPU
# with AMX / AVX512-BF16 trains the cpu-demo model ~1.25x faster, but ended step 100 at loss 6.02 against fp32's 5.90.
TRAIN_OPTS=()
[ "$PRECISION" = auto ] || TRAIN_OPTS=(--train.precision "$PRECISION" --train.save_dtype fp32)
if [ "$GPUS" -eq 0 ]; then LAUNCH=("$PY")
elif [ ${#IDS[@]} -gt 0 ]; then
  LAUNCH=(env -u CUDA_VISIBLE_DEVICES .venv/bin/deepspeed --include "localhost:$(IFS=,; echo "${IDS[*]}")")
else LAUNCH=(.venv/bin/deepspeed --num_gpus "$GPUS"); fi
launch() { "${LAUNCH[@]}" "$@"; }  # a training entry point: deepspeed over the GPUs, or one plain process on a CPU
if [ -n "$PLAN" ]; then
  echo "gpus: $GPUS${CUDA_VISIBLE_DEVICES+ (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)}"
  echo "config: configs/pretrain/$CONFIG.yaml"
  echo "launch: ${LAUNCH[*]}"
  echo "OMP_NUM_THREADS: $OMP_NUM_THREADS"
  echo "precision: $PRECISION"
  exit 0
fi

stage_setup()     { bash tools/setup_env.sh; }
stage_tokenizer() { [ -f "$TOK" ] || "$PY" tools/train_tokenizer.py --out "$TOK" --vocab_size "$VOCAB"; }
stage_data()      { "$PY" tools/prepare_data.py --inputs '[builtin:demo]' --tokenizer "$TOK" --out "$DATA/demo"; }
stage_pretrain() {
  [ -f "$BASE/final/config.json" ] && return 0
  launch llm/pretrain.py --config "configs/pretrain/$CONFIG.yaml" --data "$DATA/demo" \
    --train.run_dir "$BASE" --train.resume auto "${TRAIN_OPTS[@]}"
}
stage_eval() {
  "$PY" tools/eval.py ppl --model "$BASE/final" --source builtin:demo --split val --max_tokens 60000 \
    --json "$BASE/eval.json"
}
stage_sft() {
  [ -f "$SFT/final/config.json" ] && return 0
  launch llm/sft.py --config configs/sft/lora-demo.yaml --model "$BASE/final" --train.run_dir "$SFT" \
    --train.resume auto "${TRAIN_OPTS[@]}"
}
stage_quantize() {
  [ -f "$QUANT/config.json" ] && return 0
  "$PY" tools/quantize.py --model "$SFT/final" --out "$QUANT" --bits 4 --group_size 128 \
    --calib "$DATA/demo" --n_samples 64 --seq_len 256
}
stage_eval_quant() {  # the SFT model before and after quantization, on the same text as the base model
  "$PY" tools/eval.py ppl --model "$SFT/final" --source builtin:demo --split val --max_tokens 60000 \
    --json "$SFT/eval.json"
  "$PY" tools/eval.py ppl --model "$QUANT" --source builtin:demo --split val --max_tokens 60000 \
    --json "$QUANT/eval.json"
}
stage_gguf() { [ -f "$GGUF" ] || "$PY" tools/convert.py to_gguf --src "$SFT/final" --dst "$GGUF"; }
stage_summary() {
  "$PY" tools/pipeline_summary.py --times "$TIMES" --base "$BASE" --sft "$SFT" --quant "$QUANT" --gguf "$GGUF"
}

mkdir -p "$RUNS"
started=""
for s in "${STAGES[@]}"; do
  if [ -n "$ONLY" ]; then [ "$s" = "$ONLY" ] || [ "$s" = setup ] || continue
  elif [ -n "$FROM" ] && [ -z "$started" ]; then
    if [ "$s" = "$FROM" ]; then started=1; elif [ "$s" != setup ]; then continue; fi
  fi
  # --from/--only redo a stage: drop its output first so the skip check does not fire
  if [ "$s" = "$FROM" ] || [ "$s" = "$ONLY" ]; then
    case "$s" in
      tokenizer) rm -f "$TOK" ;;
      pretrain) rm -rf "$BASE/final" ;;
      sft) rm -rf "$SFT/final" ;;
      quantize) rm -rf "$QUANT" ;;
      gguf) rm -f "$GGUF" ;;
    esac
  fi
  echo "==> [$s]"
  t0=$(date +%s)
  if ! "stage_$s"; then
    echo "run.sh: stage '$s' failed (fix the error above, then: bash run.sh --from $s)" >&2
    exit 1
  fi
  took=$(( $(date +%s) - t0 ))
  # a stage skipped because its output was there keeps the time of the run that made it
  if [ "$took" -gt 0 ] || ! grep -q "^$s"$'\t' "$TIMES" 2>/dev/null; then printf '%s\t%s\n' "$s" "$took" >> "$TIMES"; fi
done
