# make demo | make test | make bench : each sets the machine up first (once per environment; scripts/setup.sh).
# With a virtual environment active ($VIRTUAL_ENV) everything goes there; otherwise into the project's
# own .venv, created on first use, so a system Python that refuses pip (PEP 668) is never touched.
VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
# make setup EXTRAS=dev,trl adds TRL (its tests are skipped without it); one stamp per set of extras
EXTRAS ?= dev
STAMP := $(VENV)/.nthr-kernels-setup-$(EXTRAS)

.PHONY: setup demo test bench gpu-suite
$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) EXTRAS=$(EXTRAS) bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m nthr_kernels demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

gpu-suite: $(STAMP)
	$(PY) benchmarks/gpu_suite.py
