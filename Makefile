# mes-trace-proxy — every task a developer or CI runs. `make help` lists them.
# Needs Python >= 3.11 (python3, or PYTHON=/path/to/python) and make; the rest is installed here.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

DEMO_SECONDS ?= 60
PYTEST_ARGS  ?=

.PHONY: help venv check lint format typecheck test test-fast demo bench soak system-deps clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mes-trace-proxy needs Python >= 3.11; set PYTHON=...")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP) ## create .venv and install the project with its pinned dependencies

system-deps: ## install the Debian packages the tests use (redis-server, chromium, prometheus) when missing
	@scripts/system-deps

lint: venv ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: venv ## mypy --strict on the package and the tests
	$(BIN)/mypy

check: lint typecheck ## lint and type checks

test: venv system-deps check ## everything CI runs: checks, then the whole test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv ## the test suite alone, no lint
	$(BIN)/python -m pytest -x -q $(PYTEST_ARGS)

demo: venv ## a real proxy, the MES simulator and CRM traffic for DEMO_SECONDS, spans exported
	$(BIN)/python -m mes_trace_proxy.demo --seconds $(DEMO_SECONDS)

bench: venv ## the benchmark beside nginx (installs nginx and wrk); results in bench/results/
	$(BIN)/python -m bench.run

soak: venv ## a long soak with the CRM simulator (SOAK_MINUTES, default 30)
	$(BIN)/python -m bench.soak

clean: ## remove the venv, caches and outputs
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis demo-output bench/results
