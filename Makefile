# Every target sets itself up: a fresh machine needs only Python 3 and git (and, for `make test`,
# apt for Debian's chromium).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHROMIUM := /usr/bin/chromium
# One pytest-xdist worker per core, at most 4: most tests are single-threaded or wait on the
# processes and servers they start (tests/conftest.py gives each worker its share of threads).
# worksteal: an idle worker takes queued tests from a busy one, so the long tests do not end the
# run on one worker (8 min 26 s alone on 2 cores with xdist's default, 7 min 45 s with it).
WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST := HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(WORKERS) --dist worksteal
# The inner loop: every lane but those that start processes or a browser (see tests/conftest.py).
FAST := not slow and not distributed and not browser

.PHONY: install chromium test test-fast bench demo clean

install: $(STAMP)

# torch first, pinned, so nothing resolves a CUDA build from the registry.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The browser lane drives the search page in Debian's headless Chromium, which pip cannot install.
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	    sudo=""; [ "$$(id -u)" -eq 0 ] || sudo="sudo"; \
	    $$sudo apt-get update && $$sudo apt-get install -y --no-install-recommends chromium; \
	fi

test: install chromium
	$(VENV)/bin/lint-imports
	$(PYTEST)

test-fast: install
	$(VENV)/bin/lint-imports
	$(PYTEST) -m "$(FAST)"

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/inference.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/pretrain_step.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/data.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/loader.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/startup.py

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/flava demo

clean:
	rm -rf $(VENV) runs
