# syntax=docker/dockerfile:1.7
#
# klein-worker image: FLUX.2-klein worker for rented GPUs (see docs/deploy.md).
#
#   docker build -t klein-worker .
#   docker build --build-arg CUDA_FLAVOUR=cu130 -t klein-worker:cu130 .   (the default is cu128)
#   docker build --build-arg BAKE_MODEL=black-forest-labs/FLUX.2-klein-4B \
#                --build-arg BAKE_UPSCALER_WEIGHTS=true \
#                --secret id=hf_token,env=HF_TOKEN -t klein-worker:baked .
#
# Stages, ordered so that a code change rebuilds only the last small layers:
#   deps     /opt/venv with torch (CUDA build) and the project's runtime + `gpu` dependencies, no project code
#   project  the project wheel, built from the source tree
#   weights  optional model snapshot baked into HF_HOME (BuildKit secret for the gated repo)
#   runtime  slim Python, a C compiler for Triton, non-root user, entrypoint
#
# The CUDA runtime (cudart, cuBLAS, cuDNN, NCCL) comes with torch's CUDA wheels, so the base stays a
# plain Python image instead of a CUDA image that would ship a second copy of the same libraries;
# the NVIDIA container toolkit mounts the driver and nvidia-smi at run time (see the NVIDIA_* env).

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# ---------------------------------------------------------------------------------------------------
FROM python-base AS deps
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# torch's own layer first: it is the biggest and changes least. Its CUDA build decides the oldest
# host driver the image runs on: CUDA_FLAVOUR=cu128 (the default: driver >= 570, what most Vast hosts
# run, Blackwell included) or cu130 (driver >= 580, PyPI's own build). The fleet's
# `offers.cuda_flavour` must name the same flavour (docs/provisioning.md, "CUDA supply").
# TORCH_INDEX_URL overrides the index outright. Keep within pyproject's `gpu` range.
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG CUDA_FLAVOUR=cu128
ARG TORCH_INDEX_URL=""
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/${CUDA_FLAVOUR}}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip freeze | grep -iE '^(torch|torchvision)==' > /opt/torch-constraints.txt

WORKDIR /src
COPY pyproject.toml ./
# Only the dependency lists from pyproject (not the package): editing code keeps this layer cached.
# The constraints keep the torch build chosen above; a resolver wish for another one fails loudly.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['gpu']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir --constraint /opt/torch-constraints.txt --requirement /tmp/requirements.txt

# The real nunchaku wheel (github.com/nunchaku-tech/nunchaku releases, matching torch and Python),
# by URL only: the PyPI package named `nunchaku` is an unrelated project and must never be installed.
ARG NUNCHAKU_WHEEL_URL=""
RUN if [ -n "$NUNCHAKU_WHEEL_URL" ]; then \
        case "$NUNCHAKU_WHEEL_URL" in \
            https://*.whl) ;; \
            *) echo "NUNCHAKU_WHEEL_URL must be an https URL of a .whl file: $NUNCHAKU_WHEEL_URL" >&2; exit 1 ;; \
        esac; \
        pip install --no-cache-dir --constraint /opt/torch-constraints.txt "$NUNCHAKU_WHEEL_URL"; \
    fi

# ---------------------------------------------------------------------------------------------------
FROM python-base AS project
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY handlers ./handlers
COPY provisioning ./provisioning
COPY klein_facts ./klein_facts
COPY measurement ./measurement
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# ---------------------------------------------------------------------------------------------------
FROM python-base AS weights
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Optional: bake a diffusers snapshot into HF_HOME for a faster cold start (no 16 GB pull at boot).
# The token is a BuildKit secret: it is read during this RUN only and never lands in a layer.
ARG BAKE_MODEL=""
ARG BAKE_MODEL_REVISION=main
# The diffusers layout (model_index.json + component folders), not the single-file checkpoints
# that the same repositories carry at their root and that would double the image.
ARG BAKE_ALLOW_PATTERNS="model_index.json */*"
ARG HUGGINGFACE_HUB_VERSION=2.4.0
RUN mkdir -p /models/hf
RUN --mount=type=secret,id=hf_token \
    if [ -n "$BAKE_MODEL" ]; then \
        pip install --no-cache-dir "huggingface_hub==${HUGGINGFACE_HUB_VERSION}" \
        && HF_TOKEN="$(cat /run/secrets/hf_token 2>/dev/null || true)" HF_HOME=/models/hf \
           python -c "import os; from huggingface_hub import snapshot_download; snapshot_download(os.environ['BAKE_MODEL'], revision=os.environ['BAKE_MODEL_REVISION'], allow_patterns=os.environ['BAKE_ALLOW_PATTERNS'].split(), token=os.environ.get('HF_TOKEN') or None)" \
        && printf '%s@%s\n' "$BAKE_MODEL" "$BAKE_MODEL_REVISION" > /models/hf/klein-baked; \
    fi

# ---------------------------------------------------------------------------------------------------
FROM python-base AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Triton (torch.compile) builds its small CUDA launcher with the system C compiler on first use.
# gcc is pinned; libc6-dev is not: it must equal the base image's libc6, which Debian security
# updates move (and drop from the archive), so the pin lives in PYTHON_IMAGE instead.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.0-3 libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ARG WORKER_UID=1000
RUN useradd --create-home --uid "${WORKER_UID}" --shell /bin/bash worker \
    && mkdir -p /models/hf /app \
    && chown -R worker:worker /models /app

# Weights, then the dependency venv, then the project: each later layer changes more often.
COPY --from=weights --chown=${WORKER_UID}:${WORKER_UID} /models /models
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN --mount=type=bind,from=project,source=/dist,target=/dist \
    pip install --no-cache-dir --no-deps /dist/*.whl

COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/klein-entrypoint
COPY --chmod=0755 docker/vast-onstart.sh /usr/local/bin/klein-vast-onstart
COPY --chown=${WORKER_UID}:${WORKER_UID} scripts /app/scripts

# HF_HOME is the volume for weights pulled at boot; compile caches live beside it so a mounted
# /models keeps them across restarts. METRICS_PORT serves /healthz (one port per GPU worker).
ENV HF_HOME=/models/hf \
    TORCHINDUCTOR_CACHE_DIR=/models/torchinductor \
    TRITON_CACHE_DIR=/models/triton \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    METRICS_PORT=9100 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The CUDA flavour torch was built for: `docker inspect` shows which hosts' drivers can run the image.
ARG CUDA_FLAVOUR=cu128
LABEL io.klein-worker.cuda-flavour="${CUDA_FLAVOUR}" \
      org.opencontainers.image.title="klein-worker" \
      org.opencontainers.image.description="FLUX.2-klein image-generation worker: SQS jobs in, presigned S3 images out" \
      org.opencontainers.image.licenses="Apache-2.0"

USER ${WORKER_UID}
WORKDIR /app
# Optional: the upscaler checkpoints (UPSCALER_WEIGHTS_X2/_X4, by default the official Real-ESRGAN
# files, sha256-checked; ~130 MB) into HF_HOME, so no worker fetches them from GitHub at boot.
ARG BAKE_UPSCALER_WEIGHTS=false
RUN if [ "$BAKE_UPSCALER_WEIGHTS" = "true" ]; then python -m worker fetch-weights; fi
EXPOSE 9100
# The start period covers a first-boot weight download and preload; after that a worker that stops
# answering /healthz marks the container unhealthy. With METRICS_PORT set empty the check passes.
HEALTHCHECK --interval=30s --timeout=15s --start-period=15m --retries=3 \
    CMD ["/usr/local/bin/klein-entrypoint", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/klein-entrypoint"]
