# One image for the CLI, KFP components, Ray and serving (different commands).
# Issue "Kubernetes deployment" hardens this further; not buildable on the dev boxes (no Docker engine).
FROM python:3.11.7-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml constraints.txt README.md ./
COPY userrep ./userrep
COPY feature_repo ./feature_repo
COPY components ./components
COPY pipelines ./pipelines
COPY serving ./serving
# CPU torch: PyPI's torch==2.13.0 is a multi-GB CUDA build; the CPU index has 2.13.0+cpu,
# which satisfies the ==2.13.0 pin.
RUN /opt/venv/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu \
        -c constraints.txt .

FROM python:3.11.7-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 BENTOML_DO_NOT_TRACK=True
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --create-home userrep
USER 10001
WORKDIR /home/userrep
HEALTHCHECK CMD ["userrep", "--help"]
ENTRYPOINT ["userrep"]
CMD ["demo"]
