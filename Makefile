# Sluice: `make demo` runs the local pipeline with sample traffic, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SLUICE := $(BIN)/sluice
STAMP := $(VENV)/.installed

# The ingest hot path, compiled to C extensions with mypyc (the same modules run as plain
# Python when no compiler is at hand). Rebuilt whenever a source changes.
NATIVE_SRC := gateway/fast_envelope.py schemas/flat_avro.py connectors/warehouse/layout.py connectors/warehouse/loader.py
NATIVE := $(VENV)/.native

.PHONY: native install examples demo stop test lint typecheck imports unit broker-up broker-down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(NATIVE): $(STAMP) $(NATIVE_SRC) Makefile
	@todo="$(filter %.py,$?)"; \
	case " $? " in *" $(STAMP) "*|*" Makefile "*) todo="$(NATIVE_SRC)";; esac; \
	for src in $$todo; do \
		echo "compiling $$src with mypyc"; \
		$(BIN)/mypyc $$src > $(VENV)/native.log 2>&1 \
			|| { echo "mypyc failed for $$src (see $(VENV)/native.log); running it as Python"; \
				rm -f $${src%.py}.*.so $${src%.py}__mypyc.*.so; }; \
	done
	touch $@

native: $(NATIVE)

# What the command executor starts a job's program through (its limits, and SIGKILL when
# the executor dies): a static binary when the C library allows, next to the venv's Python.
LAUNCH := $(BIN)/sluice-launch
$(LAUNCH): connectors/jobs/launch/sluice-launch.c $(STAMP)
	gcc -O2 -Wall -Wextra -static -o $@ $< 2>/dev/null || gcc -O2 -Wall -Wextra -o $@ $<

install: $(STAMP) $(NATIVE) $(LAUNCH)

# The example jobs of the command executor (C++, built with g++): the demo, the tests and
# `sluice bench jobs --executor command` run them.
JOBS_BIN := build/jobs
$(JOBS_BIN)/%: examples/jobs/%.cpp
	@mkdir -p $(JOBS_BIN)
	g++ -O2 -std=c++17 -Wall -Wextra -o $@ $<

examples: $(JOBS_BIN)/sieve $(JOBS_BIN)/noop

demo: install examples
	$(SLUICE) demo

stop: install
	$(SLUICE) demo --stop

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The layers (pyproject.toml, [tool.importlinter]): a wrong import fails here.
imports: install
	$(BIN)/lint-imports

# The tests need the real broker: start it, run everything, and stop it whatever happened.
# Three test files run at a time (each test has its own topics, groups, ports and folders).
test: install examples lint typecheck imports
	$(SLUICE) kafka start
	status=0; $(BIN)/pytest -n 3 --dist loadfile || status=$$?; $(SLUICE) kafka stop; exit $$status

clean: stop
	rm -rf .sluice
