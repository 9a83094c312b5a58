PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint run clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

lint: install
	$(BIN)/ruff check stock persist tests loadtest
	$(BIN)/ruff format --check stock persist tests loadtest

test: install lint
	$(BIN)/pytest -q

run: install
	$(BIN)/stock dev

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
