#!/usr/bin/env bash
# GPU path check (issue 5, item 6). On a machine with an NVIDIA GPU: a venv with only the serving
# install + onnxruntime-gpu (no torch), then benchmarks/gpu_check.py (CUDA EP fp32/fp16, parity vs
# CPU, latency/throughput per graph at batch 1/8/32 and the classify pipeline).
#   benchmarks/gpu_check.sh [--bundle models/default] [--batches 1,8,32]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or finds no device); nothing to check." >&2
    exit 2
fi
VENV="${GPU_VENV:-.venv-gpu}"
PY="${PYTHON:-python3}"
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q '.[gpu]'
# The base install pulls the CPU `onnxruntime`; it and onnxruntime-gpu ship the same module, so
# whichever was unpacked last wins. Keep only the GPU build.
"$VENV/bin/python" -m pip uninstall -q -y onnxruntime
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --force-reinstall --no-deps onnxruntime-gpu
"$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch in the GPU serving venv'"
exec "$VENV/bin/python" benchmarks/gpu_check.py "$@"
