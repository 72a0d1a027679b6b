"""Session-wide test settings and the fixtures every test package shares.

Settings: never reach the network, CPU engines. Fixtures: the tiny models, in-process vLLM
workers on them, a Ray cluster per test module, free ports, seeded images, perturbed weight
copies and seeded text batches.

Engines are expensive on a 2-core machine (10-25 s each), so each is started once per session and
shut down at its end. Tests that change a shared worker's weights must restore the original
weights (`load_weights(0, tiny_models.lm)`) before they return.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from rollout import ports

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


# ------------------------------------------------------------------------------------- test order

# `make test` runs whole test files on two processes (`-n 2 --dist loadfile --no-loadscope-reorder`),
# each taking the next file when it runs out. A file of several minutes taken last leaves one
# process working alone at the end, so the longest files go first (longest-processing-time order),
# the rest in collection order. Seconds per file are rough estimates (setup + calls) from the
# slowest tests `make test --durations` printed on a 2-core machine; only the order they give
# matters, and a file missing here runs after them.
LONG_FILES: dict[str, int] = {
    "tests/examples/shapesworld/test_shapes_sanity.py": 400,
    "tests/learners/test_lora.py": 360,
    "tests/cluster/test_operations.py": 280,
    "tests/cluster/test_signals.py": 200,
    "tests/cluster/test_nft_run.py": 175,
    "tests/cluster/test_worker_death.py": 140,
    "tests/cluster/test_driver_e2e.py": 140,
    "tests/cluster/test_generate.py": 120,
    "tests/cluster/test_placement_e2e.py": 120,
    "tests/examples/shapesworld/test_shapes_pretrain.py": 115,
    "tests/learners/test_learning_e2e.py": 100,
    "tests/cluster/test_qwen_e2e.py": 100,
    "tests/learners/test_bf16.py": 100,
    "tests/learners/test_weight_sync.py": 100,
    "tests/learners/test_text_learner.py": 90,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest test files first (`LONG_FILES`); a stable sort keeps each file's tests together."""
    root = Path(str(config.rootpath))

    def seconds(item: pytest.Item) -> int:
        return LONG_FILES.get(Path(str(item.path)).relative_to(root).as_posix(), 0)

    items.sort(key=lambda item: -seconds(item))


# ------------------------------------------------------------------------------- models and engines


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny LM, VLM and FLUX.1-Kontext-style generator (`actors.models.TinyModels`), built once
    into $R3RL_CACHE."""
    from actors.models import build_tiny_models

    return build_tiny_models()


@pytest.fixture(scope="session")
def text_worker_lm(tiny_models) -> Iterator:
    """In-process TextWorker on the tiny Qwen2 LM, with the weight-sync worker extension."""
    from actors.text_worker import TextWorker

    worker = TextWorker(str(tiny_models.lm), max_model_len=512, name="test-text-lm")
    yield worker
    worker.shutdown()


@pytest.fixture(scope="session")
def text_worker_vlm(tiny_models) -> Iterator:
    """In-process TextWorker on the tiny Idefics3 VLM (one image per prompt)."""
    from actors.text_worker import TextWorker

    worker = TextWorker(str(tiny_models.vlm), max_model_len=1024, name="test-text-vlm")
    yield worker
    worker.shutdown()


# ------------------------------------------------------------------------------------ Ray and ports


@pytest.fixture(scope="module")
def ray_cluster(request: pytest.FixtureRequest) -> Iterator[None]:
    """A local Ray cluster for one test module, so other modules can start their own (never
    `ray stop`: other clusters may share the machine). Its logical CPUs are the module's
    `RAY_NUM_CPUS` (default 4). Reuses a cluster that is already up, and then leaves it up."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=getattr(request.module, "RAY_NUM_CPUS", 4), include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """`free_port()` -> a TCP port on 127.0.0.1 that is free now."""
    return lambda: ports.free_port("127.0.0.1")


# ---------------------------------------------------------------------------------------- test data


@pytest.fixture(scope="session")
def make_image() -> Callable[..., np.ndarray]:
    """`make_image(seed, height=84, width=84)` -> a seeded (H, W, 3) uint8 image."""
    return _random_image


@pytest.fixture(scope="session")
def perturb_weights() -> Callable[..., Path]:
    """`perturb_weights(model_dir, out_dir, seed=1, std=0.05)` -> a noisy copy of an HF folder."""
    return _perturbed_copy


@pytest.fixture(scope="session")
def make_text_batch() -> Callable[..., list]:
    """`make_text_batch(model_path, temperature, n=4, seed=0)` -> TextSamples with behaviour log-probs."""
    return _behaviour_text_samples


def _random_image(seed: int, height: int = 84, width: int = 84) -> np.ndarray:
    """A seeded (H, W, 3) uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _perturbed_copy(model_dir: Path, out_dir: Path, seed: int = 1, std: float = 0.05) -> Path:
    """Copy an HF model folder with Gaussian noise added to every floating weight."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.suffix != ".safetensors" and item.is_file():
            shutil.copy(item, out_dir / item.name)
    gen = torch.Generator().manual_seed(seed)
    for shard in model_dir.glob("*.safetensors"):
        state = load_file(shard)
        noisy = {k: v + std * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                 for k, v in state.items()}
        save_file(noisy, out_dir / shard.name, metadata={"format": "pt"})
    return out_dir


def _behaviour_text_samples(model_path, temperature: float, n: int = 4, seed: int = 0) -> list:
    """Seeded prompts/answers of different lengths with log-probs from a plain transformers forward.

    Sampled from the model itself (multinomial at `temperature`) so the answers look like
    rollouts; `logprobs` are log softmax(logits / T) of the sampled tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from learners.logprobs import token_logprobs
    from rollout.trajectory import TextSample

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        prompt = torch.randint(5, vocab - 1, (3 + i,), generator=gen).tolist()
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(2 + 2 * i):  # answers of 2, 4, 6, ... tokens
                logits = model(torch.tensor([ids])).logits[0, -1] / temperature
                ids.append(int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)))
            answer = ids[len(prompt):]
            logits = model(torch.tensor([ids])).logits[:, len(prompt) - 1 : len(ids) - 1]
            lp = token_logprobs(logits, torch.tensor([answer]), temperature)[0].tolist()
        samples.append(TextSample(prompt_ids=prompt, answer_ids=answer, logprobs=lp, text=""))
    return samples
