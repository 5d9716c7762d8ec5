# syntax=docker/dockerfile:1
# Images of the Smart Quality Inspection System (one file, three targets):
#   serve : python slim, non-root, ONNX Runtime (CPU) only: producers, workers, sinks, stream processors,
#           notifiers, dashboard, migrations (`docker build --target serve -t sqis:serve .`)
#   gpu   : the same code on a CUDA + cuDNN runtime base with onnxruntime-gpu (CUDA/TensorRT providers)
#   train : the train extra (torch, ultralytics) for `sqis train` / `sqis eval` / `sqis model ...`
# Models are NOT baked in: workers resolve SQIS_MODEL_URI (models:/NAME@alias from the MLflow
# registry, cached under SQIS_STATE_DIR) or read a mounted .onnx file (/models). Rolling a model is a
# registry alias move, not an image build (docs/RUNBOOK.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

# ---- wheels of the project and its core dependencies (no compilers needed: all are wheels) ----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas/ schemas/
COPY infra/ infra/
COPY producers/ producers/
COPY inference_workers/ inference_workers/
COPY sinks/ sinks/
COPY stream_processors/ stream_processors/
COPY dashboard/ dashboard/
COPY training/ training/
COPY api/ api/
# the edge extra: paho-mqtt for `sqis edge` and `sqis bridge mqtt`
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir '.[opcua,api,edge]'

# ---- serve: the runtime of every long-running role (CPU) ----------------------------------------------
FROM ${PYTHON_IMAGE} AS serve
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    SQIS_STATE_DIR=/var/lib/sqis SQIS_LOG_FORMAT=json SQIS_METRICS_PORT=9400
RUN groupadd --system --gid 10001 sqis \
 && useradd --system --uid 10001 --gid sqis --home-dir /var/lib/sqis --create-home sqis
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/sqis
EXPOSE 9400
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request as u; u.urlopen(f\"http://127.0.0.1:{os.environ.get('SQIS_METRICS_PORT','9400')}/healthz\", timeout=2)"]
ENTRYPOINT ["sqis"]
CMD ["--help"]

# ---- gpu: CUDA runtime + onnxruntime-gpu (which clashes with onnxruntime: swapped, not added) ---------
FROM ${CUDA_IMAGE} AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH SQIS_STATE_DIR=/var/lib/sqis SQIS_LOG_FORMAT=json SQIS_METRICS_PORT=9400 \
    SQIS_ONNX_PROVIDERS=cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY --from=build /src /src
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir '.[gpu,api]' \
 && /opt/venv/bin/pip uninstall -y onnxruntime \
 && /opt/venv/bin/pip install --no-cache-dir --force-reinstall --no-deps 'onnxruntime-gpu>=1.18' \
 && rm -rf /src \
 && groupadd --system --gid 10001 sqis \
 && useradd --system --uid 10001 --gid sqis --home-dir /var/lib/sqis --create-home sqis
USER 10001:10001
WORKDIR /var/lib/sqis
EXPOSE 9400
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request as u; u.urlopen(f\"http://127.0.0.1:{os.environ.get('SQIS_METRICS_PORT','9400')}/healthz\", timeout=2)"]
ENTRYPOINT ["sqis"]
CMD ["--help"]

# ---- train: torch + ultralytics for training, evaluation and export ----------------------------------
FROM ${PYTHON_IMAGE} AS train
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH SQIS_STATE_DIR=/var/lib/sqis SQIS_LOG_FORMAT=json
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src /src
RUN /opt/venv/bin/pip install --no-cache-dir '/src[train]' \
 && rm -rf /src \
 && groupadd --system --gid 10001 sqis \
 && useradd --system --uid 10001 --gid sqis --home-dir /var/lib/sqis --create-home sqis
USER 10001:10001
WORKDIR /var/lib/sqis
ENTRYPOINT ["sqis"]
CMD ["train", "--help"]
