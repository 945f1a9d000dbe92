#!/usr/bin/env bash
# GPU checks in one call (<= 8 minutes): the `gpu` tests (CUDA vs CPU float32, layers split between GPU
# and CPU, bfloat16, memory_gb against the CUDA peak) and the scaling tables on random-weight models.
#
# Runs with what the GPU machine has (Python 3.12, torch with CUDA, transformers, accelerate, safetensors;
# no network): the package comes from the source tree (PYTHONPATH=src), nothing is installed, and the
# models are built from configs, so no weight files are needed.
#
# Usage: benchmarks/gpu.sh [OUTPUT_FILE]   (default: $OUT/gpu-tables.md if $OUT is set, else benchmarks/gpu-tables.md)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUTPUT="${1:-${OUT:-benchmarks}/gpu-tables.md}"
mkdir -p "$(dirname "$OUTPUT")"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

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
  echo "no CUDA device: nothing to run" | tee -a "$OUTPUT"
  exit 1
fi

echo "## gpu tests (pytest -m gpu)" >> "$OUTPUT"
echo '```' >> "$OUTPUT"
# -p no:cacheprovider: the source tree may be read-only; addopts' "not slow" is replaced by "gpu".
# Without pytest on the machine, the same checks run as a plain script.
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tail -25 | tee -a "$OUTPUT"
  tests_rc=${PIPESTATUS[0]}
else
  (cd tests && timeout 240 "$PY" -m reference.gpu_checks) 2>&1 | tail -40 | tee -a "$OUTPUT"
  tests_rc=${PIPESTATUS[0]}
fi
echo '```' >> "$OUTPUT"
echo >> "$OUTPUT"

# Scaling tables: SmolLM2-135M, Pythia-410M, Llama-3.2-1B shapes in float32, Llama-3.1-8B shape in bfloat16.
left=$(( 470 - ($(date +%s) - start) ))
if (( left > 60 )); then
  timeout "$left" "$PY" benchmarks/scaling.py --device cuda --pairs 8 --seq 128 \
      --models smollm2-135m,pythia-410m,llama-1b,llama-8b --growth-pairs 4,8,16 --growth-seq 64,128,256 \
      --out "$OUTPUT.scaling" 2>&1 | tail -5
  scaling_rc=${PIPESTATUS[0]}
  if [[ -f "$OUTPUT.scaling" ]]; then cat "$OUTPUT.scaling" >> "$OUTPUT"; rm -f "$OUTPUT.scaling"; fi
  (( scaling_rc == 124 )) && echo "scaling.py: stopped at the time limit (tables above are what finished)" >> "$OUTPUT"
else
  scaling_rc=1
  echo "scaling.py: skipped, no time left" >> "$OUTPUT"
fi
echo >> "$OUTPUT"
echo "wall time: $(( $(date +%s) - start )) s; pytest rc=$tests_rc; scaling rc=$scaling_rc" >> "$OUTPUT"
echo "tables written to $OUTPUT"
exit $(( tests_rc != 0 || scaling_rc != 0 ))
