#!/usr/bin/env bash
# The whole pipeline on the built-in bilingual corpus: tokenizer → shards → pretrain → eval → LoRA SFT (merged)
# → GPTQ → eval → GGUF, then a summary table. Minutes on a CPU (cpu-demo model); real sizes on GPUs.
#
#   bash run.sh                       # everything, skipping stages whose output is already there
#   bash run.sh --from sft            # redo sft and every stage after it
#   bash run.sh --only eval           # one stage
#   bash run.sh --config 25M --gpus 4 # a GPU-sized model on 4 GPUs (configs/pretrain/<config>.yaml)
#   bash run.sh --out /tmp/demo       # put data/ and runs/ under another directory
set -euo pipefail
cd "$(dirname "$0")"

STAGES=(setup tokenizer data pretrain eval sft quantize eval_quant gguf summary)
usage() {
  echo "usage: bash run.sh [--from STAGE] [--only STAGE] [--config NAME] [--out DIR] [--gpus N]"
  echo "stages: ${STAGES[*]}"
}
FROM=""; ONLY=""; CONFIG=""; OUT="."; GPUS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
for s in "$FROM" "$ONLY"; do
  if [ -n "$s" ] && [[ ! " ${STAGES[*]} " =~ " $s " ]]; then echo "error: unknown stage '$s'" >&2; usage >&2; exit 2; fi
done

# GPUs: all visible ones unless --gpus says otherwise; none → the cpu-demo model in one process.
if [ -z "$GPUS" ]; then
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
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} TOKENIZERS_PARALLELISM=false

launch() {  # a training entry point: deepspeed over all GPUs, or one plain process on a CPU
  if [ "$GPUS" -gt 0 ]; then .venv/bin/deepspeed --num_gpus "$GPUS" "$@"; else "$PY" "$@"; fi
}

stage_setup()     { bash tools/setup_env.sh; }
stage_tokenizer() { [ -f "$TOK" ] || "$PY" tools/train_tokenizer.py --out "$TOK" --vocab_size "$VOCAB"; }
stage_data()      { "$PY" tools/prepare_data.py --inputs '[builtin:demo]' --tokenizer "$TOK" --out "$DATA/demo"; }
stage_pretrain() {
  [ -f "$BASE/final/config.json" ] && return 0
  launch llm/pretrain.py --config "configs/pretrain/$CONFIG.yaml" --data "$DATA/demo" \
    --train.run_dir "$BASE" --train.resume auto
}
stage_eval() {
  "$PY" tools/eval.py ppl --model "$BASE/final" --source builtin:demo --split val --max_tokens 60000 \
    --json "$BASE/eval.json"
}
stage_sft() {
  [ -f "$SFT/final/config.json" ] && return 0
  launch llm/sft.py --config configs/sft/lora-demo.yaml --model "$BASE/final" --train.run_dir "$SFT" \
    --train.resume auto
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
