# tailcalld: the two commands are `make run` and `make test` (both run `make setup` first).
# All targets need root: BPF loading, bpffs, apt.
VENV ?= .venv
CONFIG ?= config/tailcalld.toml
PYTEST_ARGS ?=

.PHONY: setup run test clean bench

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/tailcalld --config $(CONFIG)

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench:
	@bash scripts/setup.sh bench
	$(VENV)/bin/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

.PHONY: install uninstall
install:
	@bash scripts/install.sh install

uninstall:
	@bash scripts/install.sh uninstall
