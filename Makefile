# make book: set up .venv and build the HTML book into _build/html
# make test: set up .venv and run the whole test suite (unit tests + nbval over book/)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EFFICIENTML_DATA ?= $(abspath ../shared/data)
export EFFICIENTML_DATA

.PHONY: setup book test unit nbval execute bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $@

book: setup
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going
	$(PY) scripts/vendor_mathjax.py _build/html

test: setup
	$(PY) -m pytest tests book --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

unit: setup
	$(PY) -m pytest tests

nbval: setup
	$(PY) -m pytest book --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg

execute: setup  # refresh the stored outputs of NB (default: every chapter)
	$(PY) scripts/execute_notebooks.py $(NB)

bench: setup
	$(PY) -m efficientml.bench loader

clean:
	rm -rf _build
