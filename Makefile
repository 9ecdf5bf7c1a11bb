# Sluice: `make demo` runs the local pipeline with sample traffic, `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SLUICE := $(BIN)/sluice
STAMP := $(VENV)/.installed

.PHONY: install demo stop test lint typecheck unit broker-up broker-down clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(SLUICE) demo

stop: install
	$(SLUICE) demo --stop

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The tests need the real broker: start it, run everything, and stop it whatever happened.
test: install lint typecheck
	$(SLUICE) kafka start
	status=0; $(BIN)/pytest || status=$$?; $(SLUICE) kafka stop; exit $$status

clean: stop
	rm -rf .sluice
