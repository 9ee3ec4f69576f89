# make demo | make test | make bench : each sets the machine up first (once; see scripts/setup.sh).
PY ?= python3
STAMP := .setup-done

.PHONY: setup demo test bench gpu-suite
$(STAMP): pyproject.toml scripts/setup.sh
	PYTHON=$(PY) bash scripts/setup.sh
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
