#!/usr/bin/env bash
# GPU path check (issue 5, item 6). On a machine with an NVIDIA GPU: a venv with only the serving
# install + onnxruntime-gpu (no torch), then benchmarks/gpu_check.py (CUDA EP fp32/fp16, parity vs
# CPU, latency/throughput per graph at batch 1/8/32 and the classify pipeline; TensorRT where offered).
#   benchmarks/gpu_check.sh [--bundle models/default] [--batches 1,8,32]
#   GPU_CHECK_TENSORRT='tensorrt-cu12-libs==10.*' benchmarks/gpu_check.sh   # also try the TensorRT provider
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or finds no device); nothing to check." >&2
    exit 2
fi
VENV="${GPU_VENV:-.venv-gpu}"
PY="${PYTHON:-python3}"
# onnxruntime-gpu's CUDA major version must match the machine's: 1.26.0 is the last CUDA 12 build (the
# Docker image's), 1.27+ are CUDA 13. The [cuda,cudnn] extras bring NVIDIA's CUDA and cuDNN wheels, so
# only the driver is needed; gpu_check.py preloads them.
ORT_GPU="${ORT_GPU:-onnxruntime-gpu[cuda,cudnn]==1.26.0}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "gpu_check: $PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); mmfusion needs 3.11 or later (set PYTHON=python3.11)." >&2
    exit 2
fi
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q .
# The base install pulls the CPU `onnxruntime`; it and onnxruntime-gpu ship the same module, so
# whichever was unpacked last wins. Keep only the GPU build.
"$VENV/bin/python" -m pip uninstall -q -y onnxruntime
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --force-reinstall "$ORT_GPU"
"$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch in the GPU serving venv'"
# TensorRT (optional): its libraries are not part of the serving install. GPU_CHECK_TENSORRT names the
# pip requirement that matches this onnxruntime-gpu's TensorRT major version (see ONNX Runtime's
# TensorRT EP requirements table), e.g. GPU_CHECK_TENSORRT='tensorrt-cu12-libs==10.*'; gpu_check.py then
# also times the pipeline through TensorrtExecutionProvider, or records why it could not start.
if [ -n "${GPU_CHECK_TENSORRT:-}" ]; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$GPU_CHECK_TENSORRT"
    TRT_LIBS="$("$VENV/bin/python" -c 'import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))' 2>/dev/null || true)"
    if [ -n "$TRT_LIBS" ]; then export LD_LIBRARY_PATH="$TRT_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; fi
fi
exec "$VENV/bin/python" benchmarks/gpu_check.py "$@"
