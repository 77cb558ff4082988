# make book: set up .venv and build the HTML book into _build/html
# make test: set up .venv and run the whole test suite (unit tests + nbval over book/)
# make lab: set up .venv and open the chapters in JupyterLab
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EFFICIENTML_DATA ?= $(abspath ../shared/data)
export EFFICIENTML_DATA

.PHONY: setup browser book test test-other-kernels smoke-device unit nbval execute bench lab clean

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

# The whole suite on every other CPU path (AVX-512 where the CPU has it, AVX2 and SSE kernels,
# 1 and 4 threads), one after the other, then a table of how far each chapter's recorded numbers moved beside their
# tolerances (results/kernel-paths.json). For the developer before a chapter is called done; not
# in CI (hours on 2 cores). One path: `$(PY) scripts/kernel_paths.py run avx2 [book/03_pruning.ipynb]`.
KERNEL_PATHS ?= avx512 avx2 sse threads1 threads4
test-other-kernels: setup browser
	@status=0; for p in $(KERNEL_PATHS); do $(PY) scripts/kernel_paths.py run $$p || status=1; done; \
	  $(PY) scripts/kernel_paths.py report; exit $$status

# Every chapter's code path on tiny settings on the best device (a GPU where there is one),
# a killed run resumed included; prints what passed. DEVICE=cuda|mps|cpu to choose.
smoke-device: setup
	$(PY) -m efficientml.smoke $(if $(DEVICE),--device $(DEVICE))

bench: setup
	$(PY) -m efficientml.bench loader

lab: setup  # JupyterLab on the chapters, on localhost only: open the URL it prints (with its token); Ctrl-C stops it
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 --no-browser $$([ "$$(id -u)" = 0 ] && echo --allow-root) book/

clean:
	rm -rf _build
