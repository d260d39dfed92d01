# One image for the CLI, KFP components, Ray and serving (different commands).
# The base image is pinned by digest, given at build time (the tag only names it; docs/kubernetes.md):
#   docker build --build-arg PYTHON_DIGEST=sha256:... -t userrep:0.1.0 .
# Every installed file is pinned by hash (requirements.lock, `make image-lock`).
ARG PYTHON_DIGEST

FROM python:3.11.7-slim-bookworm@${PYTHON_DIGEST} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY requirements.lock pyproject.toml README.md ./
# The dependencies: only the files whose hashes requirements.lock names (CPU torch comes from
# PyTorch's CPU index: PyPI's torch==2.13.0 is a multi-GB CUDA build). No build isolation, so the
# one sdist builds with the venv's own setuptools instead of an unpinned download.
RUN /opt/venv/bin/pip install --require-hashes --no-deps --no-build-isolation \
        --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.lock
COPY userrep ./userrep
COPY feature_repo ./feature_repo
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
# userrep itself (no dependency resolved here), then a check that nothing it needs is missing.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . && /opt/venv/bin/pip check

FROM python:3.11.7-slim-bookworm@${PYTHON_DIGEST}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 RAY_USAGE_STATS_ENABLED=0 BENTOML_DO_NOT_TRACK=True
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --create-home userrep
# non-root; the chart runs it on a read-only root filesystem with a writable /tmp
USER 10001
WORKDIR /home/userrep
HEALTHCHECK CMD ["userrep", "--help"]
ENTRYPOINT ["userrep"]
CMD ["demo"]
