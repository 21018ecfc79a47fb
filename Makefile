# Two commands matter: `make serve` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The constraints file pins torch to this machine's local CPU wheel (an unpinned torch pulls
# a multi-GB CUDA build); pip applies it to every install below.
PIP := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt
SERVE_VENV ?= .venv-serve

.PHONY: serve test browser-deps lint bench bench-full serving-check docker clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -q -e '.[train,dev]'
	touch $@

## make serve: install, build models/default if it is missing, serve on 0.0.0.0:8000
serve: $(VENV)/.installed
	$(BIN)/mmfusion build-default --if-missing --out models/default
	$(BIN)/mmfusion serve --bundle models/default

## make test: install (train + dev extras), lint, the serving-install check, the whole test suite
test: $(VENV)/.installed browser-deps
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory serving-check
	$(BIN)/python -m pytest

## Headless Chromium (Debian package) for the offline-docs browser test.
browser-deps:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

lint: $(VENV)/.installed
	$(BIN)/ruff check .

## The serving install (what the Docker image gets) must not contain or import torch.
serving-check:
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --disable-pip-version-check -q .
	$(SERVE_VENV)/bin/python -c "import importlib.util as u, sys; assert u.find_spec('torch') is None, 'torch is installed in the serving env'"
	cd /tmp && $(abspath $(SERVE_VENV))/bin/python -c 'import app.main, sys; app.main.create_app; assert "torch" not in sys.modules; print("serving install: no torch")'

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks.run --quick

bench-full: $(VENV)/.installed
	$(BIN)/python -m benchmarks.run --full

docker:
	docker build -t mmfusion:cpu .

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .ruff_cache build *.egg-info
