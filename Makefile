# make book: set up .venv and build the HTML book into _build/html
# make test: set up .venv and run the whole test suite (unit tests + nbval over book/)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EFFICIENTML_DATA ?= $(abspath ../shared/data)
export EFFICIENTML_DATA

.PHONY: setup browser book test test-other-kernels unit nbval execute bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $@

book: setup  # results page, jupyter-book build (warnings are errors), MathJax copied in
	$(PY) scripts/build_book.py

test: setup browser
	$(PY) -m pytest tests book --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

browser:  # Debian's Chromium for tests/test_browser.py; where it cannot be installed, that test is skipped
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "Chromium could not be installed: the browser test will be skipped"

unit: setup
	$(PY) -m pytest tests

nbval: setup
	$(PY) -m pytest book --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg

execute: setup  # refresh the stored outputs of NB (default: every chapter); differences from the old ones are reported, not raised
	EFFICIENTML_CHECK=off $(PY) scripts/execute_notebooks.py $(NB)

# The same tests on other CPU kernels (no AVX, SSE4.1 oneDNN, SSE4.2 MKL code paths): trained
# numbers change in their last bits and beyond, and every check must still pass.
KERNELS := ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=SSE4_2
test-other-kernels: setup browser
	$(KERNELS) $(PY) -m pytest tests book --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

bench: setup
	$(PY) -m efficientml.bench loader

clean:
	rm -rf _build
