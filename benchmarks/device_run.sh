#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (H100/H200, no network, torch preinstalled):
# 1. retrain the shipped demo model on the GPU (medim demo --retrain), packed into $OUT/demo_model.tgz;
# 2. benchmarks/gpu_check.py: bf16 vs float32, sampling throughput/MFU, the 3.5 B training step, compile.
# Usage (repo root): OUT=/some/dir bash benchmarks/device_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-./device_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
rm -rf /tmp/demo_model
timeout "${DEMO_TIMEOUT:-240}" python -m medim -v demo --retrain /tmp/demo_model --device cuda 2>&1 \
  | grep -v -E "it/s\]|s/it\]" | tee "$OUT/demo_build.log" | tail -n 25
[ -f /tmp/demo_model/model_index.json ] && tar -C /tmp -czf "$OUT/demo_model.tgz" demo_model
timeout "${CHECK_TIMEOUT:-260}" python benchmarks/gpu_check.py 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$OUT/gpu_check.log"
ls -la "$OUT"
