# mes-trace-proxy — every task a developer or CI runs. `make help` lists them.
# Needs Python >= 3.11 (python3, or PYTHON=/path/to/python) and make; the rest is installed here.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
# The native build (docs/performance.md): rebuilt when setup.py or a compiled module changes.
NATIVE_SRC   := $(shell $(PYTHON) mes_trace_proxy/native.py sources)
NATIVE_STAMP := $(VENV)/.native-$(shell cat setup.py $(NATIVE_SRC) | cksum | cut -d' ' -f1)

DEMO_SECONDS ?= 60
PYTEST_ARGS  ?=

.PHONY: help venv native check lint format typecheck test test-fast image-test demo bench soak system-deps clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "mes-trace-proxy needs Python >= 3.11; set PYTHON=...")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=77"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP) ## create .venv and install the project with its pinned dependencies

# In place, with the venv's mypy and dependencies (mypyc type-checks what it compiles). With
# MES_TRACE_PROXY_PURE_PYTHON=1 nothing is compiled and the sources run as they are.
$(NATIVE_STAMP): $(STAMP) setup.py $(NATIVE_SRC)
	@if [ "$${MES_TRACE_PROXY_PURE_PYTHON:-}" = 1 ]; then \
		echo "MES_TRACE_PROXY_PURE_PYTHON=1: the native build is skipped"; \
	else \
		echo "native build: mypyc compiles $(words $(NATIVE_SRC)) modules (about a minute)"; \
		$(BIN)/python setup.py --quiet build_ext --inplace > $(VENV)/native-build.log 2>&1 \
			|| { tail -30 $(VENV)/native-build.log; echo "native build failed (log: $(VENV)/native-build.log); MES_TRACE_PROXY_PURE_PYTHON=1 skips it"; exit 1; }; \
	fi
	@rm -f $(VENV)/.native-* && touch $@

native: $(NATIVE_STAMP) ## compile the hot path with mypyc, in place (make venv runs pure Python until then)

system-deps: ## install the Debian packages the tests and image-test use (redis, rabbitmq, chromium, podman, ...)
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

# tests/test_native.py holds the run to the build it asked for: compiled, unless pure was asked.
EXPECT_NATIVE = $(if $(filter 1,$(MES_TRACE_PROXY_PURE_PYTHON)),0,1)

# Then the sources again, for a pip install without the native build: every test but the fault
# scenarios (processes under load, the same code paths, timing-bound).
test: native system-deps check ## checks, the whole suite, then its sources-only pass (CI then runs image-test)
	MES_TRACE_PROXY_EXPECT_NATIVE=$(EXPECT_NATIVE) $(BIN)/python -m pytest $(PYTEST_ARGS)
	MES_TRACE_PROXY_PURE_PYTHON=1 MES_TRACE_PROXY_EXPECT_NATIVE=0 $(BIN)/python -m pytest -q --ignore=tests/faults $(PYTEST_ARGS)

# Needs no venv: docker where an engine runs, else podman (scripts/image-test says how it builds).
image-test: ## build the image, run it read-only and check it (uid, health, native, proxying, drain, size)
	@scripts/image-test

test-fast: native ## the test suite alone, no lint
	$(BIN)/python -m pytest -x -q $(PYTEST_ARGS)

demo: native ## a real proxy, the MES simulator and CRM traffic for DEMO_SECONDS, spans exported
	$(BIN)/python -m mes_trace_proxy.demo --seconds $(DEMO_SECONDS)

bench: native ## the benchmark beside nginx (installs nginx and wrk); results in bench/results/
	$(BIN)/python -m bench.run

soak: native ## a long soak with the CRM simulator (SOAK_MINUTES, default 30)
	$(BIN)/python -m bench.soak

clean: ## remove the venv, caches and outputs
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis demo-output bench/results
	rm -rf build mes_trace_proxy/*.so mes_trace_proxy/_native_sources.txt
