# syntax=docker/dockerfile:1
# The gpuyard operator image: `docker build -t gpuyard:0.1.0 .`
#
# The venv is built by hack/build-image-venv.sh, the same script tests/unit/test_image.py
# runs to prove the image's contents without a Docker engine. Both stages use the same
# base image, so the venv's interpreter link (/usr/local/bin/python3.11) holds in the final
# stage; the base is pinned by tag (add @sha256:... when promoting to a release).

FROM python:3.11.14-slim-bookworm AS venv
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# Only what the build reads (.dockerignore keeps everything else out of the context).
COPY requirements/constraints.txt requirements/
COPY hack/build-image-venv.sh hack/
# README.md is optional (the glob matches nothing when it is absent).
COPY pyproject.toml README.m[d] ./
COPY operator/ operator/
RUN PYTHON=/usr/local/bin/python3.11 bash hack/build-image-venv.sh /opt/gpuyard

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="gpuyard" \
      org.opencontainers.image.description="GPU scheduling, autoscaling and per-second usage billing for Kubernetes" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=venv /opt/gpuyard /opt/gpuyard
# Bytecode was compiled into the venv at build time; nothing is written at run time, so the
# root filesystem can be mounted read-only (the chart mounts a tmpfs at /tmp, and HOME
# points there for any library that wants a cache directory).
ENV PATH=/opt/gpuyard/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# The distroless "nonroot" UID/GID: no entry in /etc/passwd is needed to run as it.
USER 65532:65532
# /metrics and /healthz (GPUYARD_METRICS_PORT, GPUYARD_HEALTH_PORT).
EXPOSE 8080 8081
ENTRYPOINT ["gpuyard", "run"]
