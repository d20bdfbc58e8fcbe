# iscl-hsm. On a fresh Debian 12 machine, `make demo` and `make test` are all you need: each first
# runs `deps` (scripts/install-deps.sh: apt and pip, skipped when already satisfied).
PYTHON ?= python3

.PHONY: help deps demo test bench bench-quick bench-plot-deps lint fuzz adversarial soak

help:
	@echo "make demo   install what is missing, then run 'iscl demo' (a secured exchange on the demo SoftHSM2 token)"
	@echo "make test   install what is missing, then run the whole pytest suite (unit + integration)"
	@echo "make bench  ISCL (both profiles) beside TLS, a stunnel pair and plain TCP: handshakes, throughput, DICOM, gateway links (~10 min;"
	@echo "            results in benchmarks/results/latest.{md,json,png}, see docs/performance.md)"
	@echo "make bench-quick  the same on small sizes, 3 rounds (2..3 min), results in /tmp/iscl-bench-quick"
	@echo "make lint   ruff and mypy, when installed (not part of make test)"
	@echo "make deps   only install what is missing (apt and pip)"

deps:
	@PYTHON=$(PYTHON) bash scripts/install-deps.sh

demo: deps
	$(PYTHON) -m iscl_hsm demo

test: deps
	$(PYTHON) -m pytest -q tests

bench: deps bench-plot-deps
	$(PYTHON) benchmarks/run.py

bench-quick: deps bench-plot-deps
	$(PYTHON) benchmarks/run.py --quick --out /tmp/iscl-bench-quick

# matplotlib draws latest.png; installed (the `bench` extra) only when missing, and only for the benchmarks.
bench-plot-deps:
	@$(PYTHON) -c "import matplotlib" 2>/dev/null || $(PYTHON) -m pip install --disable-pip-version-check -e ".[bench]"

# Not part of `make test`: a million mutated sessions through the engine (docs/fuzzing.md; ~10 min on 2 cores).
fuzz: deps
	$(PYTHON) -m tests.fuzz.campaign --inputs 1000000 $(FUZZ_ARGS)

# Not part of `make test`: every fault kind at every frame position, both profiles, every suite, between
# real processes (docs/adversarial.md; about 40 minutes on two cores).
adversarial: deps
	ISCL_ADVERSARIAL=full $(PYTHON) -m pytest -q -p no:cacheprovider tests/integration/adversarial/test_cli_faults.py \
		tests/integration/adversarial/test_gateway_faults.py

# Not part of `make test`: 10,000 C-STOREs through a gateway pair, a tenth of the associations with a fault
# (docs/adversarial.md, "The soak").
soak: deps
	$(PYTHON) -m tests.integration.adversarial.soak --stores 10000 --fault-share 0.1 $(SOAK_ARGS)

lint:
	@status=0; \
	if $(PYTHON) -m ruff --version >/dev/null 2>&1; then $(PYTHON) -m ruff check . || status=1; \
	else echo "lint: ruff is not installed, skipped"; fi; \
	if $(PYTHON) -m mypy --version >/dev/null 2>&1; then $(PYTHON) -m mypy iscl_hsm || status=1; \
	else echo "lint: mypy is not installed, skipped"; fi; \
	exit $$status
