# splitserve developer entry points. `make run` and `make test` are all a new checkout needs.

VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.splitserve-installed

.PHONY: venv install system-deps test run lint format bench clean

# Re-installs only when the dependency declarations or the install script change.
$(STAMP): pyproject.toml constraints.txt scripts/install_venv.sh
	VENV=$(VENV) scripts/install_venv.sh
	touch $@

venv install: $(STAMP)

# redis-server and prometheus for the tests that start them (no-op when present).
system-deps:
	scripts/install_system_deps.sh

test: install system-deps
	$(PYTHON) -m pytest -q -ra

# Offline generation on a tiny random-weight model (engine/demo.py).
run: install
	$(PYTHON) -m cluster serve --once

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PYTHON) benchmarks/engine_throughput.py

clean:
	rm -rf $(STAMP) .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
