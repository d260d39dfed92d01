# userrep — the two README commands are `make demo` and `make test`.
# Set-up is stamp-based: .venv is (re)built only when pyproject.toml or constraints.txt change.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Manifest validators pin old packages (checkov: packaging 23, networkx 2.6) that would downgrade
# the main stack: they get their own venv.
TOOLS  := .tools
TOOLS_STAMP := $(TOOLS)/.installed
WORK   ?= work
PYTEST_ARGS ?=

# No telemetry, no tokens in ~/.ray, no surprise downloads.
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export BENTOML_DO_NOT_TRACK := True
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.DEFAULT_GOAL := help
.PHONY: help install demo serve lint test test-fast system-deps bench lock image-lock clean

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

$(TOOLS_STAMP): tools-requirements.txt
	@test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet -r tools-requirements.txt
	@touch $(TOOLS_STAMP)

install: $(STAMP) $(TOOLS_STAMP) ## Create .venv (and .tools, the manifest validators) (fast when current)

demo: $(STAMP) ## Run the main job on the embedded default (synthetic world)
	$(BIN)/userrep demo --work $(WORK)

serve: $(STAMP) ## Serve the promoted batch on 127.0.0.1 (Ray Serve :8000, BentoML :3000) until Ctrl-C
	$(BIN)/userrep serve --work $(WORK)

lint: $(STAMP) $(TOOLS_STAMP) ## Lint (ruff check), formatting (ruff format --check) and types (mypy userrep/); config: pyproject.toml
	$(TOOLS)/bin/ruff check .
	$(TOOLS)/bin/ruff format --check .
	$(TOOLS)/bin/mypy --python-executable $(BIN)/python

test: $(STAMP) $(TOOLS_STAMP) system-deps ## Run the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# What the tests start besides Python: a real redis-server, headless Chromium (Debian packages).
SYSTEM_DEPS := redis-server chromium
system-deps: ## Install the Debian packages the tests start, where missing
	@missing=""; for c in $(SYSTEM_DEPS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (Debian packages the tests start)"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test-fast: $(STAMP) $(TOOLS_STAMP) ## Run the tests not marked slow (inner loop)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP) ## Run the benchmarks (JSON on stdout; never part of the tests)
	@for f in bench/*.py; do [ $$f = bench/serving_bare.py ] && continue; echo "# $$f" >&2; $(BIN)/python $$f; done  # serving_bare: a helper

lock: ## Re-resolve dependencies from pyproject.toml into constraints.txt
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	{ echo "# Full resolved dependency set (make lock). Installed with pip -c so every machine gets the same versions."; \
	  .lock-venv/bin/pip freeze --exclude-editable | sed -E 's/^(torch==[0-9.]+)\+cpu$$/\1/'; } > constraints.txt
	rm -rf .lock-venv

image-lock: $(STAMP) ## Pin every file the image installs by hash (requirements.lock; linux x86_64, CPython 3.11)
	rm -rf .image-wheels && grep -v -e '^#' -e '^torch==' constraints.txt > .image-wheels.txt
	$(BIN)/python -c "from k8s.image_lock import BUILD_PINS; print(*(f'{k}=={v}' for k, v in BUILD_PINS.items()), sep='\n')" >> .image-wheels.txt
	$(BIN)/pip download --quiet --no-deps -r .image-wheels.txt -d .image-wheels
	$(BIN)/pip download --quiet --no-deps torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu -d .image-torch
	$(BIN)/python k8s/image_lock.py .image-wheels .image-torch/*.whl > requirements.lock
	rm -rf .image-wheels .image-wheels.txt .image-torch

clean: ## Remove the virtualenv and generated data
	rm -rf $(VENV) $(TOOLS) $(WORK) .pytest_cache
