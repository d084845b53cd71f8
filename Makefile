# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv on first use and install what they need into it.
PYTHON ?= python3.11
VENV ?= .venv
# torch first, pinned to the builds this project is tested with; override on machines that need another
# build (e.g. TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu124").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PIP = $(VENV)/bin/python -m pip
# the demo needs the package only; the tests add anomalib, Lightning, Ray, the server and Playwright
DEMO_STAMP = $(VENV)/.clipfusion-demo-installed
STAMP = $(VENV)/.clipfusion-installed

.PHONY: test demo lint bench clean

$(DEMO_STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PIP) install -q --disable-pip-version-check -e .
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PIP) install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/python -m pytest -q

demo: $(DEMO_STAMP)
	$(VENV)/bin/clipfusion demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/bench_metrics.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
