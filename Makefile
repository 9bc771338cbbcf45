# ELS reproduction pipeline. `make run` sets up and runs the default config; `make test` sets up and
# runs the tests. See README.md.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= config.yaml
CORES ?= all
SNAKEMAKE := $(PY) -m snakemake --cores $(CORES) --workflow-profile workflow/profiles/default
# the config files first (a YAML error with its file and line), then Snakemake; when Snakemake fails
# and left a lock (a run that was killed), say the one command that clears it
CHECK_CONFIG := $(PY) -m els.settings $(CONFIG)
LOCK_HINT := if [ -n "$$(ls -A .snakemake/locks 2>/dev/null)" ]; then echo; \
	echo "Snakemake found a lock in .snakemake/locks. If no other run is using this folder (e.g. the last one was interrupted), clear it with: make unlock   (then rerun make run)"; fi

.PHONY: setup run report dry-run unlock test lint clean

# The virtual environment: CPU/CUDA torch from PyPI first (pinned), then this package with the
# workflow and test tools (pyproject.toml's `dev` extra), then the CPU kernel compiled once into
# ~/.cache/els (els/kernel.py; about 30 s; without a compiler this step stops with an error naming
# what to install). Redone when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[dev]'
	$(PY) -c "from els.kernel import compiled_kernel; compiled_kernel()"
	touch $@

setup: $(VENV)/.installed

# FashionMNIST is found by the data rule: torchvision's download, else a local copy in
# data.local_dirs (default /usr/share/datasets/fashion-mnist), else apt-get (as root).
run: setup
	@$(CHECK_CONFIG)
	$(SNAKEMAKE) --configfile $(CONFIG) || { status=$$?; $(LOCK_HINT); exit $$status; }
	$(SNAKEMAKE) --configfile $(CONFIG) --report results/report.html
	@echo "done: results/summary.csv, results/figures/, results/report.html"

report: setup
	$(SNAKEMAKE) --configfile $(CONFIG) --report results/report.html

dry-run: setup
	@$(CHECK_CONFIG)
	$(SNAKEMAKE) --configfile $(CONFIG) --dry-run || { status=$$?; $(LOCK_HINT); exit $$status; }

# after an interrupted run: remove Snakemake's stale lock (results stay; rerun make run)
unlock: setup
	$(SNAKEMAKE) --configfile $(CONFIG) --unlock

# pytest-xdist: one worker per core; the workflow tests are chains of short jobs that leave a core
# mostly idle, so test files run side by side (each file, or each group of files sharing one tiny
# workflow run, on one worker: tests/conftest.py)
test: setup
	$(PY) -m pytest -n auto

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/snakefmt --check Snakefile workflow/rules
	$(PY) -m snakemake --lint --configfile $(CONFIG)

clean:
	rm -rf results logs .snakemake
