#!/usr/bin/env bash
# The GPU benchmark in one script of at most 4 minutes: needs only Python with PyTorch (+torchvision)
# and this folder, no Ray, MLflow or network. Record its output with the card's name in
# benchmarks/RESULTS.md.   usage: bash benchmarks/gpu.sh [--tiny] [flags of benchmarks/gpu_bench.py]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
exec timeout 240 "$PY" benchmarks/gpu_bench.py "$@"
