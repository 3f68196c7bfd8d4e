# Every target sets itself up: a fresh machine needs only Python 3 and git.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test bench demo clean

install: $(STAMP)

# torch first, pinned, so nothing resolves a CUDA build from the registry.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: install
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/inference.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/pretrain_step.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/data.py

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/flava demo

clean:
	rm -rf $(VENV) runs
