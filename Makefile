# Everything a fresh machine needs: a venv, the pinned CPU torch first (a bare `torch` would pull
# a multi-GB CUDA build), then the package with its test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.specdraft-installed

.PHONY: demo test install bench ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/specdraft run

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: install
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

ui: install
	DAGSTER_HOME=$${DAGSTER_HOME:-$(CURDIR)/data/dagster_home} $(BIN)/dagster dev -w workspace.yaml

clean:
	rm -rf data/store data/dagster_home
