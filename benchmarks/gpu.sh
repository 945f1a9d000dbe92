#!/usr/bin/env bash
# GPU checks in one call (<= 9 minutes): the `gpu` tests (CUDA vs CPU float32, layers split between GPU
# and CPU, bfloat16, memory_gb against the CUDA peak), then the speed and memory tables on CUDA with
# random-weight models (benchmarks/scaling.py: fwd+bwd, atp, atp*, eap, edge atp* as ratios to one
# forward+backward, minimum of interleaved rounds, CUDA allocator peaks).
#
# Runs with what the GPU machine has (Python 3.12, torch with CUDA, transformers; no network): the package
# comes from the source tree (PYTHONPATH=src), nothing is installed, the models are built from configs (no
# weight files). A tree to compare with can be given as TREES (label=path,...; e.g. TREES=v0.2=/x,now=.).
#
# Usage: benchmarks/gpu.sh [OUTPUT_FILE]   (default: $OUT/gpu-tables.md if $OUT is set, else benchmarks/gpu-tables.md)
#        GPU_SH_CHECK=1 benchmarks/gpu.sh    (no GPU needed: checks the tools and runs the tables' code on the CPU
#                                            with a tiny model, then stops)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUTPUT="${1:-${OUT:-benchmarks}/gpu-tables.md}"
mkdir -p "$(dirname "$OUTPUT")"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
TREES_ARG=()
[[ -n "${TREES:-}" ]] && TREES_ARG=(--trees "$TREES")
start=$(date +%s)

if [[ -n "${GPU_SH_CHECK:-}" ]]; then
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" || exit 1
  timeout 300 "$PY" benchmarks/scaling.py --device cpu --models tiny-llama --pairs 2 --seq 8 --rounds 2 \
      --calls "atp,atp*,eap,edge atp*" --growth-model tiny-llama --growth-pairs 1,2 --growth-seq 4,8 \
      --growth-rounds 1 "${TREES_ARG[@]}" --out "$OUTPUT" > /dev/null || exit 1
  echo "check passed: tables in $OUTPUT"
  exit 0
fi

{
  echo "# atpstar GPU run"
  echo
  "$PY" - <<'PYEOF'
import torch, transformers
print(f"card: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE'}; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}); transformers {transformers.__version__}")
PYEOF
  echo
} > "$OUTPUT"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: nothing to run (GPU_SH_CHECK=1 checks this script on a CPU)" | tee -a "$OUTPUT"
  exit 1
fi

echo "## gpu tests (pytest -m gpu)" >> "$OUTPUT"
echo '```' >> "$OUTPUT"
# -p no:cacheprovider: the source tree may be read-only; addopts' "not slow" is replaced by "gpu".
# Without pytest on the machine, the same checks run as a plain script.
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tail -25 | tee -a "$OUTPUT"
  tests_rc=${PIPESTATUS[0]}
else
  (cd tests && timeout 200 "$PY" -m reference.gpu_checks) 2>&1 | tail -40 | tee -a "$OUTPUT"
  tests_rc=${PIPESTATUS[0]}
fi
echo '```' >> "$OUTPUT"
echo >> "$OUTPUT"

# Speed and memory: SmolLM2-135M, Pythia-410M, Llama-3.2-1B shapes in float32 (all five node types, edges),
# then Llama-3.1-8B's shape in bfloat16 (nodes only), each written as soon as it is done.
table_rc=0
run_tables() {  # $1: seconds at most; the rest: scaling.py arguments
  local limit=$1; shift
  local left=$(( 520 - ($(date +%s) - start) ))
  (( left < 60 )) && { echo "scaling.py $*: skipped, no time left" >> "$OUTPUT"; table_rc=1; return; }
  (( limit > left )) && limit=$left
  timeout "$limit" "$PY" benchmarks/scaling.py --device cuda --no-growth --rounds 3 --threads 4 "${TREES_ARG[@]}" \
      --out "$OUTPUT.part" "$@" 2>&1 | tail -3
  local rc=${PIPESTATUS[0]}
  [[ -f "$OUTPUT.part" ]] && { cat "$OUTPUT.part" >> "$OUTPUT"; rm -f "$OUTPUT.part"; }
  (( rc == 124 )) && echo "scaling.py: stopped at the time limit (tables above are what finished)" >> "$OUTPUT"
  (( rc != 0 )) && table_rc=$rc
}
run_tables 300 --models smollm2-135m,pythia-410m,llama-1b --pairs 8 --seq 128 --calls "atp,atp*,eap,edge atp*"
run_tables 200 --models llama-8b --pairs 4 --seq 128 --calls "atp,atp*"
echo >> "$OUTPUT"
echo "wall time: $(( $(date +%s) - start )) s; pytest rc=$tests_rc; tables rc=$table_rc" >> "$OUTPUT"
echo "tables written to $OUTPUT"
exit $(( tests_rc != 0 || table_rc != 0 ))
