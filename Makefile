# The README's commands: `make run`, `make test` and `make test-fast`. All set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements.stamp
HOST   ?= 127.0.0.1
PORT   ?= 8501

.PHONY: setup run test test-fast demo lint bench clean-venv

setup: $(STAMP)

# requirements.txt pins the tested versions; then the project itself, editable (the `geohier`
# command, and `import geohier` / `pipeline` from anywhere without sys.path edits).
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Build the demo world, its labels and the demo model if the workspace lacks them.
demo: setup
	$(PY) -m pipeline quickstart

run: demo
	$(PY) -m pipeline.serve --server.address $(HOST) --server.port $(PORT) --server.headless true

test: setup
	$(PY) -m pytest

# The quick loop while editing: unit tests and doctests, without the browser, training and
# other slow tests (pytest markers `browser` and `slow`).
test-fast: setup
	$(PY) -m pytest -q -m "not browser and not slow"

lint: setup
	$(PY) -m ruff check .

bench: setup
	@for f in bench/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean-venv:
	rm -rf $(VENV)
