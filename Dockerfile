# syntax=docker/dockerfile:1
# mmfusion serving image: FastAPI + ONNX Runtime, no torch.
#   CPU:  docker build -t mmfusion:cpu .
#   GPU:  docker build --build-arg VARIANT=gpu -t mmfusion:gpu .
# The bundle is read from /models/default (mount or COPY a bundle there); the vector index
# lives in /data/index (mount a volume).
#
# Hardened run: a non-root user (uid 10001, no shell, no home), a read-only root file system with
# the index volume as the only writable path, no capabilities, no privilege escalation. The server
# writes nothing else (no bytecode: PYTHONDONTWRITEBYTECODE=1; logs go to stderr); the small /tmp
# tmpfs is for libraries that insist on a scratch directory.
#   docker run --read-only --tmpfs /tmp:rw,noexec,nosuid,size=16m \
#     -v mmfusion-index:/data -v "$PWD/models/default:/models/default:ro" \
#     --cap-drop ALL --security-opt no-new-privileges -p 8000:8000 mmfusion:cpu
# Images are never fetched by URL (no server-side request forgery); no route reads a path from the
# request; bundles are refused unless every file matches its sha256 in manifest.json.
ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
# onnxruntime-gpu for that CUDA: 1.26.0 is the last release built for CUDA 12 and cuDNN 9 (its CUDA
# provider needs libcudart.so.12, libcudnn.so.9; 1.27 and later need CUDA 13). Unpinned, pip took a
# CUDA 13 build that cannot load on this base, and ONNX Runtime fell back to the CPU.
ARG ORT_GPU_VERSION=1.26.0

# ---- build the wheel (no extras, no torch) -------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY app ./app
COPY model ./model
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

# ---- CPU runtime base ----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV ORT_PACKAGE=onnxruntime
RUN python -m venv /opt/venv

# ---- CUDA runtime base (cuDNN included, as onnxruntime-gpu needs) ---------------------------
FROM ${CUDA_IMAGE} AS base-gpu
ARG ORT_GPU_VERSION
ENV ORT_PACKAGE=onnxruntime-gpu==${ORT_GPU_VERSION}
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# ---- final image ---------------------------------------------------------------------------
FROM base-${VARIANT} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MMFUSION_BUNDLE=/models/default \
    MMFUSION_INDEX_PATH=/data/index \
    MMFUSION_TRT_CACHE_DIR=/data/trt-cache \
    MMFUSION_HOST=0.0.0.0 \
    MMFUSION_PORT=8000
# Dependencies first, pinned by the serving lock (the versions `make test` ran on; wheels for all of
# them exist for the GPU base's Python 3.12 too), in their own layer so that a code change rebuilds
# only the small wheel layer below.
COPY deploy/requirements-serving.txt /tmp/requirements-serving.txt
RUN pip install --no-cache-dir -r /tmp/requirements-serving.txt
COPY --from=wheel /wheels /wheels
# `pip check` proves the pinned set satisfies the wheel's requirements. Then, for the GPU image,
# onnxruntime is swapped for onnxruntime-gpu (both provide the same module, so only one may be
# installed), its dependencies held to the lock's versions, and the set checked again, where the only
# complaint allowed is the wheel's own requirement on the name "onnxruntime".
RUN pip install --no-cache-dir --no-deps /wheels/*.whl \
 && pip check \
 && if [ "$ORT_PACKAGE" != "onnxruntime" ]; then \
      set -e; \
      grep -v '^onnxruntime==' /tmp/requirements-serving.txt > /tmp/gpu-constraints.txt; \
      pip uninstall -y onnxruntime; \
      pip install --no-cache-dir -c /tmp/gpu-constraints.txt "$ORT_PACKAGE"; \
      pip check > /tmp/pip-check.txt || true; \
      if grep -v -e 'requires onnxruntime, which is not installed' -e '^No broken requirements found' \
           /tmp/pip-check.txt; then exit 1; fi; \
    fi \
 && python -c "import onnxruntime, importlib.util as u; assert u.find_spec('torch') is None" \
 && rm -rf /wheels /tmp/requirements-serving.txt /tmp/gpu-constraints.txt /tmp/pip-check.txt \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin mmfusion \
 && mkdir -p /models /data/index && chown -R mmfusion /data
USER 10001
WORKDIR /tmp
EXPOSE 8000
VOLUME ["/data"]
# A GPU start that cannot use CUDA either fails (MMFUSION_PROVIDERS naming CUDA) or serves on the CPU
# with an error logged (auto): never the GPU's precision on the CPU. With TensorRT the first start
# builds engines for minutes: give it a longer --health-start-period. `docker stop` waits 10 s by
# default and requests may take up to MMFUSION_REQUEST_TIMEOUT_S (30 s): run with --stop-timeout 40.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD python -c "import os,urllib.request as u,sys; port=os.environ.get('MMFUSION_PORT','8000'); sys.exit(0 if u.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/readyz', timeout=2).status == 200 else 1)"
CMD ["mmfusion", "serve"]
