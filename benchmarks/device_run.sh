#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (H100/H200, no network, torch preinstalled), one call:
# benchmarks/gpu_check.py, its sections most wanted first (training MFU, compiled sampling with and
# without CUDA graphs, context caching, LoRA memory, distillation costs), each saved as it ends.
# precision and sampling were measured on an H200 (benchmarks/RESULTS.md); SKIP="" runs them too.
# (The demo model ships in the package and is built on CPU: `medim demo --retrain DIR`.)
# Usage (repo root): OUT=/some/dir bash benchmarks/device_run.sh
# Rehearsal on CPU, shrunk (do this before spending device time): TINY=1 OUT=/tmp/x bash benchmarks/device_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-./device_out}; mkdir -p "$OUT"
[ -n "${TINY:-}" ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${CHECK_TIMEOUT:-540}" python benchmarks/gpu_check.py ${TINY:+--tiny} --skip "${SKIP-precision,sampling}" 2>&1 \
  | grep -v -E "it/s\]|s/it\]" | tee "$OUT/gpu_check.log"
ls -la "$OUT"
