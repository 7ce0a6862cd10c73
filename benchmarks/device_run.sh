#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (H100/H200, no network, torch preinstalled):
# benchmarks/gpu_check.py: bf16 vs float32, sampling throughput/MFU, the 3.5 B training step, compile.
# (The demo model ships in the package and is built on CPU: `medim demo --retrain DIR`.)
# Usage (repo root): OUT=/some/dir bash benchmarks/device_run.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-./device_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${CHECK_TIMEOUT:-260}" python benchmarks/gpu_check.py 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$OUT/gpu_check.log"
ls -la "$OUT"
