# Two commands on a fresh machine:  make demo   and   make test
# Each creates (once) its own virtual environment in .venv and installs wsi-norm into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install gpu-test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.demo

test: $(STAMP) lint
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || ( [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null ) \
	  || echo "note: no chromium; the Prefect UI browser test needs Debian's chromium package"
	$(PY) -m pytest -q

gpu-test: $(STAMP)
	$(PY) -m pytest -q -m gpu

# the gates `make test` runs first: ruff (pinned), the layers contract (.importlinter), mypy --strict
lint: $(STAMP)
	$(VENV)/bin/ruff check wsi_norm flows tests bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy --strict wsi_norm flows tests

clean:
	rm -rf $(VENV) demo-out .pytest_cache
