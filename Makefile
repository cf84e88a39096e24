# Two commands for a newcomer: `make demo` runs the stack, `make test` runs the tests.
# Both create .venv on first use and install exactly the versions in the lock; later runs are quick.
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed

# The lock for this machine: PyTorch's CPU build, or its CUDA build (PyPI's) where there is a GPU.
GPU := $(shell command -v nvidia-smi)
LOCK := requirements/$(if $(GPU),cuda,cpu).txt
UV_VERSION = $(shell sed -n 's/^uv==//p' $(LOCK))
# Where the CPU build of torch lies. uv does not read pip's configuration, so it gets the folder
# of wheels that pip is configured with; without one, PyTorch's CPU index.
TORCH_WHEELS = $(or $(PIP_FIND_LINKS),$(shell python3 -m pip config get global.find-links 2>/dev/null))
TORCH_SOURCE = $(if $(TORCH_WHEELS),--find-links $(TORCH_WHEELS),\
	--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
# The machines the locks are for: CPython 3.11 on x86-64 Linux (CI's and ours).
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--custom-compile-command "make lock"

.PHONY: demo test reliability lint format lock clean-venv

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)
	$(UV) pip sync -q --python $(PY) $(if $(GPU),,$(TORCH_SOURCE)) $(LOCK)
	$(UV) pip install -q --python $(PY) --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pagedserve demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The reliability suite's full run (tests/reliability/: more requests, longer, 1,000+ fuzz cases);
# its ledgers land in benchmarks/reliability/ for RESULTS.md. `make test` runs a bounded subset.
reliability: $(STAMP)
	PAGEDSERVE_RELIABILITY=full PAGEDSERVE_RELIABILITY_REPORT=benchmarks/reliability \
		$(VENV)/bin/pytest tests/reliability $(PYTEST_ARGS); status=$$?; \
		$(PY) -m benchmarks.reliability_report benchmarks/reliability; exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# Refresh every lock to today's releases, then run the whole suite on them (torch stays where
# requirements/torch.in holds it).
lock: $(STAMP)
	$(UV) pip compile -q --upgrade $(LOCK_TARGET) pyproject.toml --extra dev \
		-c requirements/torch.in $(TORCH_SOURCE) -o requirements/cpu.txt
	$(UV) pip compile -q --upgrade $(LOCK_TARGET) pyproject.toml --extra dev \
		-c requirements/torch.in -o requirements/cuda.txt
	$(UV) pip compile -q --upgrade $(LOCK_TARGET) requirements/fastchat.in -o requirements/fastchat.txt
	$(UV) pip compile -q --upgrade $(LOCK_TARGET) requirements/fastchat-worker.in \
		-c requirements/torch.in $(TORCH_SOURCE) -o requirements/fastchat-worker.txt
	$(UV) pip compile -q --upgrade $(LOCK_TARGET) requirements/vllm.in \
		-c requirements/torch.in $(TORCH_SOURCE) -o requirements/vllm.txt
	$(MAKE) test

clean-venv:
	rm -rf $(VENV)
