#!/usr/bin/env bash
# One short run of the GPU checks (benchmarks/gpu.py, tests/test_device.py), for a machine with a
# CUDA GPU: the CUDA-parametrised tests, phase-A step times (plain vs J-RAS, fp32 vs bf16, 128 and
# 224 px) and a federation of four real ACDC sites sharing the GPU at 224 px, in fp32 and bf16.
#
#   benchmarks/gpu_check.sh OUT_DIR [DATA_DIR]      # DATA_DIR: `python -m benchmarks.gpu pack-acdc` output
#   benchmarks/gpu_check.sh --dry-run OUT_DIR       # the same steps at tiny sizes on the CPU
#
# Where Python packages are missing (a machine without a registry), wheels in .whl/ are installed
# into /tmp/site first. Each step's output goes to OUT_DIR/gpu-check.log; a failed step does not
# stop the others, and the script's exit code is the number of failed steps.
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:?usage: gpu_check.sh [--dry-run] OUT_DIR [DATA_DIR]}"
DATA="${2:-.gpudata/acdc}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
export FLWR_HOME="$(mktemp -d)"
if ! "$PY" -c "import monai, faiss, nibabel, flwr, cryptography" 2>/dev/null && [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD:${PYTHONPATH:-}"
  export PATH="/tmp/site/bin:$PATH"
else
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
fi
FAILED=0
step() {  # step NAME COMMAND...
  echo "=== $1 ($(date +%T))" | tee -a "$OUT/gpu-check.log"
  shift
  if ! "$@" 2>&1 | tee -a "$OUT/gpu-check.log"; then FAILED=$((FAILED + 1)); echo "=== FAILED" | tee -a "$OUT/gpu-check.log"; fi
}
set -o pipefail
step "machine" "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
if [ "$DRY" = 1 ]; then
  step "device tests" "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py
  step "phase-A steps" "$PY" -m benchmarks.gpu steps --sizes 32,64 --slices 32 --repeats 1 --channels 8,16,32 --precisions fp32,bf16 --device cpu --out "$OUT"
  [ -f "$DATA/manifest.csv" ] || step "pack ACDC" "$PY" -m benchmarks.gpu pack-acdc --patients 2 --out "$DATA"
  step "federation" "$PY" -m benchmarks.gpu federation --data "$DATA" --size 32 --rounds 1 --local-epochs 1 --device cpu --precisions fp32 --config configs/demo.yaml --out "$OUT"
else
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    step "device tests" "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_device.py tests/test_spatial_augment.py
  fi
  if [ "${SKIP_STEPS:-0}" != 1 ]; then
    step "phase-A steps" "$PY" -m benchmarks.gpu steps --sizes 128,224 --slices 320 --repeats 3 --device cuda --out "$OUT"
  fi
  step "phase-A steps, wide segmenter" "$PY" -m benchmarks.gpu steps --sizes 224 --slices 320 --repeats 2 --channels 32,64,128,256,512 --device cuda --out "$OUT/wide"
  step "federation" "$PY" -m benchmarks.gpu federation --data "$DATA" --size 224 --rounds "${ROUNDS:-4}" --local-epochs 2 --device cuda --precisions fp32,bf16 --timeout 220 --out "$OUT"
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>&1 | tee -a "$OUT/gpu-check.log"
fi
echo "=== done: $FAILED failed step(s)" | tee -a "$OUT/gpu-check.log"
exit "$FAILED"
