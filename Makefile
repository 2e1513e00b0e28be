# Quickstart: `make demo` and `make test` on a machine with Python 3.10+ and pip (another
# interpreter: `make demo PYTHON=python3.11`).
# Both create (or reuse) .venv and install the project into it first.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := demo_out
FER    ?= ../shared/datasets/fer2013

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@# (made again when it lacks pip, say made before python3-venv was installed, or its
	@# Python is older than 3.10: a first try with an old python3 left one that PYTHON=python3.11
	@# could not replace)
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null && $(PY) -m pip --version >/dev/null 2>&1 \
		|| $(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# Synthetic faces -> Parquet shards -> a small CPU training run with every report.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(PY) jobs/make_synthetic.py --output $(DEMO)/faces --train-per-class 300 --val-per-class 60 --size 48
	$(PY) jobs/prepare.py --source $(DEMO)/faces --output $(DEMO)/shards
	$(PY) jobs/train.py --config configs/demo.yaml --data $(DEMO)/shards --output $(DEMO)/run
	@echo "Demo run folder: $(DEMO)/run (history.csv, learning_curves.png, confusion_matrix.png, best/)"

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache

# Benchmarks against plain PyTorch on FER2013 (FER=folder with train/ and val/); not in CI.
bench: $(STAMP)
	$(PY) bench/run_all.py --data $(FER)
