"""Weight sync through real engines: DeepSpeed learners (ZeRO-3, 2 ranks) -> vLLM / diffusers workers.

One Ray cluster, two learner ranks and two text workers for the module. The learner model is a
small Qwen2 whose MLP matrices exceed ZeRO-3's persistence threshold (1e5 elements), so they are
really partitioned across the two ranks and the per-bucket gather is exercised.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rollout.interfaces import ChatMessage, TextRequest

pytestmark = pytest.mark.integration
RAY_NUM_CPUS = 6  # the `ray_cluster` fixture's: two learner ranks and two workers per model

PROMPTS = ("draw a red circle", "a cat on a mat")


def _build_partitionable_lm(tiny_lm: Path, out: Path) -> Path:
    """Qwen2 with the tiny tokenizer, hidden 128 but MLP 1024 wide (131k-element matrices)."""
    from transformers import AutoConfig, Qwen2ForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_lm)
    cfg.intermediate_size = 1024
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.save_pretrained(out)
    for f in tiny_lm.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "generation_config.json"):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def lm_dir(tiny_models, tmp_path_factory) -> Path:
    return _build_partitionable_lm(tiny_models.lm, tmp_path_factory.mktemp("lm"))


@pytest.fixture(scope="module")
def text_learners(ray_cluster, lm_dir) -> Iterator:
    """Two TextLearner ranks (ZeRO-3) as Ray actors, started the way the driver starts them."""
    from learners.group import LearnerGroup

    group = LearnerGroup("text", 2, num_cpus_per=0.5, model_path=str(lm_dir), zero_stage=3, lr=2e-2,
                         micro_batch_size=4, temperature=1.0)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def text_workers(ray_cluster, lm_dir) -> Iterator[list]:
    import ray

    from actors.text_worker import remote_text_worker

    workers = [remote_text_worker(i, num_cpus=0.5, num_gpus=0, model_path=str(lm_dir), max_model_len=256)
               for i in range(2)]
    ray.get([w.version.remote() for w in workers])
    yield workers
    for w in workers:
        try:
            ray.get(w.shutdown.remote())
        except Exception:  # a test may have killed it on purpose
            pass


@pytest.fixture(scope="module")
def broadcast_sync():
    """One coordinator for the module: the restart test reuses the group the first test formed."""
    from learners.weight_sync import make_weight_sync

    sync = make_weight_sync("broadcast", bucket_mb=1.0)
    yield sync
    sync.shutdown()


def train_once(learners, workers: list, seed: int) -> None:
    """One GRPO step on samples drawn from worker 0, with +/-1 advantages, sharded over ranks."""
    import ray

    requests = [TextRequest(messages=(ChatMessage("user", p),), n=4, temperature=1.0, max_tokens=12, seed=seed + i)
                for i, p in enumerate(PROMPTS)]
    samples = [s for group in ray.get(workers[0].generate.remote(requests)) for s in group]
    learners.train_step(samples, [1.0 if i % 2 == 0 else -1.0 for i in range(len(samples))])


def learner_checksum(learners) -> float:
    return learners.call_all("weights_checksum")[0]


def assert_workers_hold(workers: list, learners, version: int) -> float:
    import ray

    want = learner_checksum(learners)
    assert ray.get([w.version.remote() for w in workers]) == [version] * len(workers)
    for got in ray.get([w.weights_checksum.remote() for w in workers]):
        assert got == pytest.approx(want, rel=1e-10, abs=1e-8)
    return want


def assert_greedy_matches_transformers(workers: list, learners, out_dir: Path) -> None:
    """vLLM's greedy answer on every worker equals transformers' on the learner's saved weights."""
    import ray
    from transformers import AutoModelForCausalLM

    saved = learners.call_all("save", str(out_dir))[0]
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    requests = [TextRequest(messages=(ChatMessage("user", p),), n=1, temperature=0.0, max_tokens=10)
                for p in PROMPTS]
    for worker in workers:
        for group in ray.get(worker.generate.remote(requests)):
            sample = group[0]
            with torch.no_grad():
                ref = model.generate(torch.tensor([sample.prompt_ids]), max_new_tokens=10, do_sample=False,
                                     pad_token_id=model.config.pad_token_id)[0, len(sample.prompt_ids):].tolist()
            assert sample.answer_ids == ref[: len(sample.answer_ids)]
            assert len(sample.answer_ids) == 10 or sample.finish_reason == "stop"


def test_broadcast_sync_reaches_every_text_worker(text_learners, text_workers, broadcast_sync, tmp_path):
    before = learner_checksum(text_learners)
    train_once(text_learners, text_workers, seed=1)
    report = broadcast_sync.sync(text_learners, text_workers, version=1)
    after = assert_workers_hold(text_workers, text_learners, version=1)
    assert abs(after - before) > 1e-3  # the step really changed the weights that were synced
    # ZeRO-3: bucket by bucket, never the whole model in full at once
    assert report.buckets > 2
    assert 0 < report.sender["peak_gathered_numel"] < report.sender["total_numel"]
    assert_greedy_matches_transformers(text_workers, text_learners, tmp_path / "v1")


def test_object_store_sync_reaches_every_text_worker(text_learners, text_workers, tmp_path):
    from learners.weight_sync import make_weight_sync

    train_once(text_learners, text_workers, seed=2)
    report = make_weight_sync("object_store").sync(text_learners, text_workers, version=2)
    assert report.bytes > 0
    assert_workers_hold(text_workers, text_learners, version=2)
    assert_greedy_matches_transformers(text_workers, text_learners, tmp_path / "v2")


def test_restarted_worker_gets_current_weights_then_rejoins_broadcast(text_learners, text_workers, lm_dir,
                                                                    broadcast_sync):
    import ray

    from actors.text_worker import remote_text_worker

    sync = broadcast_sync
    train_once(text_learners, text_workers, seed=4)
    sync.sync(text_learners, text_workers, version=3)  # (re)forms the group if run alone
    ray.kill(text_workers[1])
    text_workers[1] = remote_text_worker(1, num_cpus=0.5, num_gpus=0, model_path=str(lm_dir), max_model_len=256)
    assert ray.get(text_workers[1].version.remote()) == 0
    assert sync.resync(text_workers[1]) == 3  # before it serves: the current version
    assert_workers_hold(text_workers, text_learners, version=3)
    train_once(text_learners, text_workers, seed=3)
    sync.sync(text_learners, text_workers, version=4)  # the group is rebuilt with the new member
    assert_workers_hold(text_workers, text_learners, version=4)


# ---- diffusion: 2 FlowGRPO learner ranks -> 2 diffusers workers --------------------------------------
IMAGE_SETTINGS_KW = dict(num_steps=4, noise_level=0.7, stochastic="all", height=32, width=32)


@pytest.fixture(scope="module")
def flux_dir(tiny_models) -> Path:
    return tiny_models.flux


@pytest.fixture(scope="module")
def diffusion_learners(ray_cluster, flux_dir) -> Iterator:
    from learners.group import LearnerGroup

    group = LearnerGroup("diffusion", 2, num_cpus_per=0.5, model_path=str(flux_dir), zero_stage=3, lr=1e-2,
                         micro_batch_size=8)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def diffusion_workers(ray_cluster, flux_dir) -> Iterator[list]:
    import ray

    from actors.diffusion_worker import remote_diffusion_worker

    workers = [remote_diffusion_worker(i, num_cpus=0.5, num_gpus=0, model_path=str(flux_dir)) for i in range(2)]
    ray.get([w.version.remote() for w in workers])
    yield workers
    ray.get([w.shutdown.remote() for w in workers])


def images_of(worker) -> list:
    """Deterministic images (ODE sampling, fixed seeds) for comparing workers' weights."""
    import ray

    from rollout.interfaces import ImageRequest, SamplerSettings

    settings = SamplerSettings(**{**IMAGE_SETTINGS_KW, "stochastic": "none"})
    requests = [ImageRequest(prompt=p, seed=7, noise_seed=7) for p in PROMPTS]
    return [s.image for s in ray.get(worker.sample.remote(requests, settings))]


def train_diffusion_once(learners, workers: list, seed: int) -> None:
    import ray

    from rollout.interfaces import ImageRequest, SamplerSettings

    requests = [ImageRequest(prompt=p, seed=seed * 100 + k, noise_seed=seed) for p in PROMPTS for k in range(4)]
    samples = ray.get(workers[0].sample.remote(requests, SamplerSettings(**IMAGE_SETTINGS_KW)))
    learners.train_step(samples, [1.0 if i % 2 == 0 else -1.0 for i in range(len(samples))])


@pytest.mark.parametrize("kind", ["broadcast", "object_store"])
def test_sync_reaches_every_diffusion_worker(diffusion_learners, diffusion_workers, kind):
    import numpy as np

    from learners.weight_sync import make_weight_sync

    version = 1 if kind == "broadcast" else 2
    before = images_of(diffusion_workers[0])
    train_diffusion_once(diffusion_learners, diffusion_workers, seed=version)
    report = make_weight_sync(kind, bucket_mb=0.05).sync(diffusion_learners, diffusion_workers, version=version)
    assert report.workers == 2 and report.version == version
    if kind == "broadcast":
        assert report.buckets > 1
    assert_workers_hold(diffusion_workers, diffusion_learners, version=version)
    after = [images_of(w) for w in diffusion_workers]
    for a, b in zip(after[0], after[1], strict=True):
        np.testing.assert_array_equal(a, b)  # both workers draw with the same weights
    assert any(not np.array_equal(a, b) for a, b in zip(before, after[0], strict=True))
