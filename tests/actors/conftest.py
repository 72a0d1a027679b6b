"""Shared fixtures for engine tests under tests/actors: tiny models, vLLM workers, one Ray cluster.

Engines are expensive on a 2-core box (10-25 s each), so each is started once per session and
shut down at its end. Tests that change a shared worker's weights must restore the original
weights (`load_weights(0, tiny_models.lm)`) before they return.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from actors.models import TinyModels, build_tiny_models


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    """The tiny LM, VLM and FLUX.1-Kontext-style generator, built once into $R3RL_CACHE."""
    return build_tiny_models()


@pytest.fixture(scope="session")
def text_worker_lm(tiny_models: TinyModels) -> Iterator:
    """In-process TextWorker on the tiny Qwen2 LM, with the weight-sync worker extension."""
    from actors.text_worker import TextWorker

    worker = TextWorker(str(tiny_models.lm), max_model_len=512, name="test-text-lm")
    yield worker
    worker.shutdown()


@pytest.fixture(scope="session")
def text_worker_vlm(tiny_models: TinyModels) -> Iterator:
    """In-process TextWorker on the tiny Idefics3 VLM (one image per prompt)."""
    from actors.text_worker import TextWorker

    worker = TextWorker(str(tiny_models.vlm), max_model_len=1024, name="test-text-vlm")
    yield worker
    worker.shutdown()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster for one test module, so other packages' modules can start their own
    (never `ray stop`: other clusters share the box)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def make_image():
    """`make_image(seed, height=84, width=84)` -> a seeded (H, W, 3) uint8 image."""
    return _random_image


@pytest.fixture(scope="session")
def perturb_weights():
    """`perturb_weights(model_dir, out_dir, seed=1, std=0.05)` -> a noisy copy of an HF folder."""
    return _perturbed_copy


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
