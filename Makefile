# Two commands matter: `make serve` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The constraints file pins torch to this machine's local CPU wheel (an unpinned torch pulls
# a multi-GB CUDA build); the serving lock pins the serving stack to the versions the Docker image
# ships, so the tests run on exactly those. pip applies both to every install below.
SERVING_LOCK := deploy/requirements-serving.txt
PIP := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt -c $(SERVING_LOCK)
SERVE_VENV ?= .venv-serve
# pip-audit's own venv, inside .venv-serve (ignored, removed by `make clean`) but separate from it.
AUDIT_VENV ?= $(SERVE_VENV)/audit-tool

.PHONY: serve test browser-deps lint bench bench-full serving-check audit lock docker clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt $(SERVING_LOCK) | $(BIN)/python
	$(PIP) -q -e '.[train,dev]'
	touch $@

## make serve: install, build models/default if it is missing, serve on 0.0.0.0:8000
serve: $(VENV)/.installed
	$(BIN)/mmfusion build-default --if-missing --out models/default
	$(BIN)/mmfusion serve --bundle models/default

## make test: install (train + dev extras), lint, the serving-install check, the audit report, the whole test suite
test: $(VENV)/.installed browser-deps
	$(BIN)/ruff check .
	$(MAKE) --no-print-directory serving-check
	@$(MAKE) --no-print-directory audit || echo "audit: see above (reported, not failing the tests: advisories change daily and the service may be unreachable)"
	$(BIN)/python -m pytest

## Headless Chromium (Debian package) for the offline-docs browser test.
browser-deps:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

lint: $(VENV)/.installed
	$(BIN)/ruff check .

## The serving install (what the Docker image gets) must not contain or import torch.
serving-check:
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --disable-pip-version-check -q -c $(SERVING_LOCK) .
	$(SERVE_VENV)/bin/python -c "import importlib.util as u, sys; assert u.find_spec('torch') is None, 'torch is installed in the serving env'"
	cd /tmp && $(abspath $(SERVE_VENV))/bin/python -c 'import app.main, sys; app.main.create_app; assert "torch" not in sys.modules; print("serving install: no torch")'

## make audit: known vulnerabilities (pip-audit) in the serving install, .venv-serve (what the Docker image
## gets). pip-audit runs from its own venv and audits .venv-serve's pinned package list, so its own
## dependencies are neither audited nor shipped. Prints every advisory; exit 1 if any was found, 2 if
## nothing could be checked (vulnerability service unreachable), 0 if clean.
audit:
	@test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	@$(SERVE_VENV)/bin/python -m pip install --disable-pip-version-check -q -c $(SERVING_LOCK) .
	@test -x $(AUDIT_VENV)/bin/pip-audit || ($(PYTHON) -m venv $(AUDIT_VENV) \
	  && $(AUDIT_VENV)/bin/python -m pip install --disable-pip-version-check -q 'pip-audit>=2.7')
	@$(SERVE_VENV)/bin/python -m pip freeze --disable-pip-version-check --exclude-editable \
	  | grep -v '^mmfusion' > $(AUDIT_VENV)/serving-requirements.txt
	@cd $(AUDIT_VENV) && total=$$(wc -l < serving-requirements.txt); \
	  ./bin/pip-audit --disable-pip --no-deps --progress-spinner off -r serving-requirements.txt >report.txt 2>stderr.txt; \
	  rc=$$?; cat report.txt; skipped=$$(grep -c 'could not be audited' report.txt); \
	  echo "audit: $$((total - skipped)) of $$total serving packages checked (pip-audit exit $$rc; 1 = vulnerabilities listed above)"; \
	  if [ "$$skipped" -ge "$$total" ] || [ ! -s report.txt ]; then \
	    echo "audit: nothing could be checked (vulnerability service unreachable?): $$(tail -n 1 stderr.txt)"; exit 2; fi; \
	  exit $$rc

## make bench: quick benchmark (< 5 min), results in benchmarks/results/bench-quick.{json,md,png}.
## The eager baseline uses $(MMFUSION_BENCH_RUN) (the bundle's training run) when set.
$(VENV)/.bench-installed: pyproject.toml constraints.txt $(SERVING_LOCK) | $(BIN)/python
	$(PIP) -q -e '.[train,dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.run --quick

bench-full: $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.run --full

## make lock: re-resolve the serving install in a fresh venv and pin it (after changing the dependencies).
lock:
	rm -rf build/lock-venv && $(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/python -m pip install --disable-pip-version-check -q .
	sed -n '/^#/p' $(SERVING_LOCK) > build/lock.txt
	build/lock-venv/bin/python -m pip freeze --disable-pip-version-check --exclude-editable | grep -v '^mmfusion' >> build/lock.txt
	mv build/lock.txt $(SERVING_LOCK) && rm -rf build/lock-venv
	@echo "wrote $(SERVING_LOCK); run make test"

docker:
	docker build -t mmfusion:cpu .

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .ruff_cache build *.egg-info
