# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it (again only when pyproject.toml changed).
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.muva-installed
PYTEST_ARGS ?=

.PHONY: install browser demo lab test test-fast bench

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-cache-dir -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the part-mask explorer's browser test (Debian package; root installs it with apt-get).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: chromium is missing; install it (apt-get install chromium) for the browser test"; fi; }

demo: install
	$(BIN)/muva demo

# JupyterLab on the workbook: served from the project root, opened on notebooks/, kernels from .venv
lab: install
	$(BIN)/muva lab

test: install browser
	$(BIN)/python -m pytest -n auto --maxprocesses=4 --maxschedchunk=1 --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/eval_scale.py
