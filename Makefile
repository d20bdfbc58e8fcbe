# iscl-hsm. On a fresh Debian 12 machine, `make demo` and `make test` are all you need: each first
# runs `deps` (scripts/install-deps.sh: apt and pip, skipped when already satisfied).
PYTHON ?= python3

.PHONY: help deps demo test bench lint

help:
	@echo "make demo   install what is missing, then run 'iscl demo' (a secured exchange on the demo SoftHSM2 token)"
	@echo "make test   install what is missing, then run the whole pytest suite (unit + integration)"
	@echo "make bench  handshake latency and payload rates on SoftHSM2 (benchmarks/core.py)"
	@echo "make lint   ruff and mypy, when installed (not part of make test)"
	@echo "make deps   only install what is missing (apt and pip)"

deps:
	@PYTHON=$(PYTHON) bash scripts/install-deps.sh

demo: deps
	$(PYTHON) -m iscl_hsm demo

test: deps
	$(PYTHON) -m pytest -q tests

bench: deps
	$(PYTHON) benchmarks/core.py

lint:
	@status=0; \
	if $(PYTHON) -m ruff --version >/dev/null 2>&1; then $(PYTHON) -m ruff check . || status=1; \
	else echo "lint: ruff is not installed, skipped"; fi; \
	if $(PYTHON) -m mypy --version >/dev/null 2>&1; then $(PYTHON) -m mypy iscl_hsm || status=1; \
	else echo "lint: mypy is not installed, skipped"; fi; \
	exit $$status
