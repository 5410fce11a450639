#!/usr/bin/env bash
# bench/gpu.sh — the GPU benchmark and checks as one command (bench/gpu.py lists what each section measures):
# training tokens/s, MFU and peak memory per ZeRO stage (ours eager/compiled vs transformers), peak memory per
# ZeRO config on one GPU, attention-kernel parity, bf16 vs fp32 losses, fp16 start-up through fit() (no abort
# while the loss scale settles), ZeRO-3 evaluation samples (no hang, same as ZeRO-0), perplexity and greedy
# decoding on the GPU (vs CPU and transformers), decoding speed, context extension (YaRN + LongLoRA) with
# passkey tests, and LongLoRA's peak memory at 8k context.
#
# 1. Here, once (needs PyPI; pinned to the versions in .venv):
#        bash bench/gpu.sh --wheels        # -> wheels/ (gitignored): deepspeed, jsonargparse, gguf, pydantic, ...
# 2. On one H100/H200 with torch, transformers and peft but no network, from the repository root, <= 8 minutes:
#        bash bench/gpu.sh
#    The device call: command "bash bench/gpu.sh", carry ["wheels"], timeout_s 600.
#    It installs what the machine lacks from wheels/ (pip --no-index), the repository itself (--no-deps), runs
#    every section in its own process under its own time cap, and writes gpu.json, gpu.md and gpu.log to $OUT
#    (out/gpu/ when OUT is unset). A section that fails records its error there and the next one runs.
# 3. CPU rehearsal, tiny sizes, every section (~45 s of CPU time; ~3 min wall on a busy 2-core machine), in
#    tests/test_gpu_bench.py so CI catches rot:
#        bash bench/gpu.sh --dry-run
# Other arguments go to bench/gpu.py (e.g. --only train,decode). PYTHON=... picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
ARGS=()
for a in "$@"; do
  case "$a" in
    --dry-run) MODE=dry ;;
    --wheels) MODE=wheels ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done
WHEELS=${WHEELS:-wheels}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

# What the GPU machine lacks (or may lack): deepspeed and the toolkit's CLI/GGUF deps, with their own deps.
# Binary ones are fetched for CPython 3.12 on x86-64 Linux, the GPU machine's Python.
PACKAGES="deepspeed hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions einops py-cpuinfo
msgpack ninja psutil jsonargparse docstring-parser typeshed-client pyyaml gguf"

if [ "$MODE" = wheels ]; then
  set -e
  quiet() { grep -v -e "is ignored" -e "^Requirement already satisfied" || true; }
  pins=$("$PY" - $PACKAGES <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{d}=={version(d)}" for d in sys.argv[1:]))
EOF
)
  tmp="$WHEELS.tmp"
  rm -rf "$tmp" && mkdir -p "$tmp"
  ds=$(tr ' ' '\n' <<<"$pins" | grep '^deepspeed==')
  # deepspeed is an sdist: build its pure-python wheel (no ops compiled; the build imports this venv's torch)
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp" "$ds" 2>&1 | quiet
  # shellcheck disable=SC2046
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 \
    -d "$tmp" $(tr ' ' '\n' <<<"$pins" | grep -v '^deepspeed==') 2>&1 | quiet
  rm -rf "$WHEELS" && mv "$tmp" "$WHEELS"
  echo "$pins" > "$WHEELS/requirements.txt"
  ls "$WHEELS"
  echo "wheels: $(ls "$WHEELS"/*.whl | wc -l) files, $(du -sh "$WHEELS" | cut -f1) in $WHEELS/ (carry [\"$WHEELS\"])"
  exit 0
fi

OUTDIR=${OUT:-out/gpu}
if [ "$MODE" = gpu ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "bench/gpu.sh: no CUDA GPU visible to $PY — run it on a GPU machine, or pass --dry-run for the CPU rehearsal"
    exit 3
  fi
fi
mkdir -p "$OUTDIR"
exec > >(tee "$OUTDIR/gpu.log") 2>&1
t0=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ "$MODE" = gpu ]; then
  # Install only what is missing; what the machine has (torch above all) is kept.
  if ! "$PY" -c "import deepspeed, jsonargparse, gguf, hjson, pydantic" >/dev/null 2>&1; then
    if [ ! -d "$WHEELS" ]; then
      echo "bench/gpu.sh: deepspeed & co. are missing and there is no $WHEELS/ — build it where PyPI is"
      echo "reachable ('bash bench/gpu.sh --wheels') and carry the folder ($WHEELS) with the call"
      exit 4
    fi
    reqs=$(tr ' ' '\n' < "$WHEELS/requirements.txt" | grep -E '^(deepspeed|jsonargparse|gguf)==' | tr '\n' ' ')
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" $reqs "jsonargparse[signatures]" \
      || { echo "[gpu.sh] resolver install failed: installing every wheel with --no-deps";
           "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl; }
  fi
  if ! "$PY" -c "import llm.train" >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
      || echo "[gpu.sh] pip install -e . failed: using PYTHONPATH"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader 2>/dev/null || true
  setup=$(( $(date +%s) - t0 ))
  echo "[gpu.sh] setup: $setup s"
  # All sections share what is left of GPU_BUDGET_S (default 450 s: the whole run stays under 8 minutes); when the
  # caps would not fit, the later ones shrink in proportion (bench/gpu.py --budget; a --budget given here wins).
  "$PY" bench/gpu.py --out "$OUTDIR" --budget $(( ${GPU_BUDGET_S:-450} - setup )) "${ARGS[@]}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" bench/gpu.py --dry-run --out "$OUTDIR" "${ARGS[@]}"
fi
rc=$?
echo "[gpu.sh] total: $(( $(date +%s) - t0 )) s (exit $rc)"
exit $rc
