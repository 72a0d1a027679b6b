"""DiffusionLearner through real DeepSpeed (gloo, CPU) in Ray actors on the tiny FLUX.1-Kontext.

Shows: the log-prob of every stored SDE step recomputed by the learner equals the
DiffusionWorker's (|ratio − 1| < 1e-5 per step, generations and edits), the first update runs at
ratio 1, and 2 ZeRO-3 ranks with gradient checkpointing give the same transformer after one step
as one rank without it (fp32, 1e-5).
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.integration

ADVANTAGES = [1.0, -1.0, 0.5, -0.5]
# adam_eps 1e-6: see tests/learners/test_text_learner.py (Adam's first step amplifies float noise).
COMMON = dict(lr=1e-3, adam_eps=1e-6, warmup_steps=0, grad_clip=1.0, kl_coef=0.05, kl_mode="mean",
              clip_range=0.2, image_loss_weight=2.0, dtype="float32")


@pytest.fixture(scope="module")
def image_data(tiny_models) -> tuple:
    """4 images (2 generations, 2 edits), SDE at every step but the last: 3 stored steps each;
    and the unconditional (empty prompt) embeddings for train-time CFG."""
    from actors.diffusion_worker import DiffusionWorker
    from rollout.interfaces import ImageRequest, SamplerSettings

    worker = DiffusionWorker(str(tiny_models.flux))
    try:
        settings = SamplerSettings(num_steps=4, noise_level=0.7, stochastic="all", guidance=3.5, height=64, width=64)
        gen = worker.sample([ImageRequest(prompt=f"a red circle {i}", seed=i, noise_seed=0) for i in range(2)],
                            settings)
        edits = worker.sample([ImageRequest(prompt="make it blue", seed=10 + i, noise_seed=1,
                                            source_image=gen[i].image) for i in range(2)], settings)
        neg_embeds, neg_pooled = worker.encode([""])
    finally:
        worker.shutdown()
    return gen + edits, (neg_embeds[0].numpy(), neg_pooled[0].numpy())


@pytest.fixture(scope="module")
def image_samples(image_data) -> list:
    return image_data[0]


@pytest.fixture(scope="module")
def single(ray_cluster, tiny_models):
    from learners.group import LearnerGroup

    group = LearnerGroup("diffusion", 1, num_cpus_per=1, name_prefix="test-diffusion-single",
                         model_path=str(tiny_models.flux), zero_stage=0, micro_batch_size=3, **COMMON)
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def single_step(single, image_samples):
    before = single.call_rank0("compute_log_probs", image_samples)
    metrics = single.train_step(image_samples, ADVANTAGES)
    after = single.call_all("full_state_dict")[0]
    return before, metrics, after


def test_recomputed_step_log_probs_equal_sampler(single_step, image_samples):
    before, _, _ = single_step
    assert image_samples[2].source_latents is not None  # the edits are scored with their source
    for sample, recomputed in zip(image_samples, before, strict=True):
        assert len(recomputed) == len(sample.log_probs) == 3
        for old, new in zip(sample.log_probs.tolist(), recomputed, strict=True):
            assert abs(math.exp(new - old) - 1.0) < 1e-5


def test_first_step_metrics(single_step):
    _, m, _ = single_step
    assert abs(m["ratio_min"] - 1) < 1e-5 and abs(m["ratio_max"] - 1) < 1e-5
    assert m["clip_frac"] == 0 and m["kl_loss"] < 1e-10
    assert m["num_images"] == 4 and m["num_steps"] == 12
    assert m["pg_loss"] == pytest.approx(-sum(ADVANTAGES) / 4, abs=1e-6)  # ratio 1: −mean A
    assert 0 < m["grad_norm"] < float("inf") and m["images_per_s"] > 0


def test_zero3_two_ranks_match_single_rank(ray_cluster, tiny_models, image_samples, single_step):
    from learners.group import LearnerGroup

    _, single_metrics, expected = single_step
    group = LearnerGroup("diffusion", 2, num_cpus_per=1, name_prefix="test-diffusion-z3",
                         model_path=str(tiny_models.flux), zero_stage=3, micro_batch_size=3,
                         gradient_checkpointing=True, **COMMON)
    try:
        before = group.call_all("full_state_dict")[0]
        metrics = group.train_step(image_samples, ADVANTAGES)
        got = group.call_all("full_state_dict")[0]
    finally:
        group.shutdown()
    assert metrics["grad_norm"] == pytest.approx(single_metrics["grad_norm"], rel=1e-4)
    assert max(float((expected[k] - before[k]).abs().max()) for k in expected) > 1e-4
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0, msg=name)


def test_train_time_cfg_with_velocity_kl(ray_cluster, tiny_models, image_data):
    """The no-CFG-at-sampling + guided-training variant runs; velocity KL grows after an update.
    Also the cosine lr schedule reaches the learner's optimizer (over 2 updates: lr, then lr / 2)."""
    from learners.group import LearnerGroup

    samples, negative = image_data
    kwargs = {**COMMON, "kl_mode": "velocity", "lr": 1e-2, "lr_decay_steps": 2}
    group = LearnerGroup("diffusion", 1, num_cpus_per=1, name_prefix="test-diffusion-cfg",
                         model_path=str(tiny_models.flux), zero_stage=2, micro_batch_size=6, cfg_scale=2.0, **kwargs)
    try:
        with pytest.raises(Exception, match="negative_embeds"):
            group.train_step(samples[:2], ADVANTAGES[:2])
        first = group.train_step(samples[:2], ADVANTAGES[:2], negative_embeds=negative)
        second = group.train_step(samples[:2], ADVANTAGES[:2], negative_embeds=negative)
    finally:
        group.shutdown()
    assert first["kl_loss"] < 1e-12 < second["kl_loss"]  # policy == reference only before the update
    assert (first["lr"], second["lr"]) == pytest.approx((1e-2, 5e-3))
    assert abs(first["ratio_mean"] - 1) > 1e-4  # the sampler did not guide: CFG changes the density


def test_cfg_sampling_log_probs_round_trip(ray_cluster, tiny_models):
    """A worker sampling with true CFG (settings.cfg_scale) and a learner rescoring with the same
    cfg_scale and the worker's empty-prompt embeddings agree: ratio 1 before any update. CFG
    changes the samples (the same seeds without it give other latents)."""
    from actors.diffusion_worker import DiffusionWorker
    from learners.group import LearnerGroup
    from rollout.interfaces import ImageRequest, SamplerSettings

    worker = DiffusionWorker(str(tiny_models.flux))
    try:
        settings = SamplerSettings(num_steps=3, noise_level=0.7, stochastic="all", guidance=3.5, cfg_scale=3.0)
        requests = [ImageRequest(prompt="a red circle", seed=0, noise_seed=0)]
        guided = worker.sample(requests, settings)
        plain = worker.sample(requests, SamplerSettings(num_steps=3, noise_level=0.7, stochastic="all", guidance=3.5))
        edit = worker.sample([ImageRequest(prompt="make it blue", seed=1, noise_seed=1, source_image=guided[0].image)],
                             settings)
        neg, neg_pooled = worker.encode([""])
    finally:
        worker.shutdown()
    assert not torch.allclose(torch.as_tensor(guided[0].latents[-1]), torch.as_tensor(plain[0].latents[-1]))
    samples = guided + edit
    negative = (neg[0].float().numpy(), neg_pooled[0].float().numpy())
    group = LearnerGroup("diffusion", 1, num_cpus_per=1, name_prefix="test-diffusion-cfg-rt",
                         model_path=str(tiny_models.flux), zero_stage=0, micro_batch_size=2, cfg_scale=3.0, **COMMON)
    try:
        recomputed = group.call_rank0("compute_log_probs", samples, negative_embeds=negative)
    finally:
        group.shutdown()
    for sample, new in zip(samples, recomputed, strict=True):
        assert len(new) == len(sample.log_probs) == 2
        for a, b in zip(sample.log_probs.tolist(), new, strict=True):
            assert abs(math.exp(b - a) - 1) < 1e-5


def test_four_x_vae_generator_log_probs_round_trip(ray_cluster, tmp_path):
    """A pipeline whose VAE downsamples by 4 (the ShapesWorld generator: 64 tokens for 64 px, not
    16): the worker samples and the learner rescores with the token grid of that VAE."""
    from actors.diffusion_worker import DiffusionWorker
    from examples.shapesworld.models import build_shapes_flux
    from learners.group import LearnerGroup
    from rollout.interfaces import ImageRequest, SamplerSettings

    pipe = build_shapes_flux()
    assert pipe.vae_scale_factor == 4
    pipe.save_pretrained(str(tmp_path / "flux"))
    worker = DiffusionWorker(str(tmp_path / "flux"), max_sequence_length=48)
    try:
        settings = SamplerSettings(num_steps=3, noise_level=0.7, stochastic="all", guidance=3.5, height=64, width=64)
        gen = worker.sample([ImageRequest(prompt="a red circle", seed=0, noise_seed=0)], settings)
        edit = worker.sample([ImageRequest(prompt="make it blue", seed=1, noise_seed=1, source_image=gen[0].image)],
                             settings)
    finally:
        worker.shutdown()
    samples = gen + edit
    assert samples[0].latents[0].shape == (64, 64)  # (8 × 8 packed tokens, 16 channels × 2 × 2)
    group = LearnerGroup("diffusion", 1, num_cpus_per=1, name_prefix="test-diffusion-4x",
                         model_path=str(tmp_path / "flux"), zero_stage=0, micro_batch_size=2, **COMMON)
    try:
        recomputed = group.call_rank0("compute_log_probs", samples)
    finally:
        group.shutdown()
    for sample, new in zip(samples, recomputed, strict=True):
        assert len(new) == len(sample.log_probs) == 2
        for a, b in zip(sample.log_probs.tolist(), new, strict=True):
            assert abs(math.exp(b - a) - 1.0) < 1e-5
