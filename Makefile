# Two entry points for a fresh machine (Python 3.11 and npm present): `make main` and `make test`.
# The venv is built once; re-running reuses it (the stamp changes only when the lock file does).
# requirements.lock pins every package (pip-compile from requirements.txt; the command is in its header), so a
# fresh clone installs what the machine that wrote docs/RESULTS.md ran.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PRESET ?= quick

.PHONY: main test test-fast setup fetch clean-venv

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

fetch: $(STAMP)
	$(VENV)/bin/flowsan models fetch

main: fetch
	$(VENV)/bin/flowsan run $(PRESET)

test: fetch
	$(PY) -m pytest -q tests

# The inner loop: everything but the smoke-run, browser and other slow tests (a few minutes on 2 cores).
test-fast: fetch
	$(PY) -m pytest -q -m "not slow and not browser" tests

clean-venv:
	rm -rf $(VENV)
