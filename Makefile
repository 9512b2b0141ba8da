# Two commands for a fresh machine: `make demo` (set up, run the main job) and `make test` (set up, run tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,report]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

demo: $(STAMP)
	$(PY) -m qmambair demo --out demo-output

bench: $(STAMP)
	$(PY) benchmarks/scan.py
	$(PY) benchmarks/model.py

clean:
	rm -rf $(VENV) demo-output build *.egg-info src/*.egg-info
