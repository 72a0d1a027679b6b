"""The CPS step end to end on the tiny FLUX.1-Kontext: a DiffusionWorker sampling with
`sde="cps"` and a DiffusionLearner rescoring with `sde="cps"` (real DeepSpeed, gloo, in a Ray
actor) agree on every stored step's log-prob, so the first update runs at ratio 1; rescoring the
same steps with FlowGRPO's step instead gives other log-probs (the learner must be told).
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.integration

ADVANTAGES = [1.0, -1.0, 0.5, -0.5]
COMMON = dict(lr=1e-3, adam_eps=1e-6, warmup_steps=0, grad_clip=1.0, kl_coef=0.05, kl_mode="mean",
              clip_range=0.2, image_loss_weight=2.0, dtype="float32", zero_stage=0, micro_batch_size=4)


@pytest.fixture(scope="module")
def cps_samples(tiny_models) -> list:
    """2 generations and 2 edits, CPS at every step but the last (η = 0.7): 2 stored steps each."""
    from actors.diffusion_worker import DiffusionWorker
    from rollout.interfaces import ImageRequest, SamplerSettings

    worker = DiffusionWorker(str(tiny_models.flux))
    try:
        settings = SamplerSettings(num_steps=3, noise_level=0.7, stochastic="all", guidance=3.5, sde="cps")
        gen = worker.sample([ImageRequest(prompt=f"a red circle {i}", seed=i, noise_seed=0) for i in range(2)],
                            settings)
        edits = worker.sample([ImageRequest(prompt="make it blue", seed=10 + i, noise_seed=1,
                                            source_image=gen[i].image) for i in range(2)], settings)
        with pytest.raises(ValueError, match="must be <= 1 for the CPS step"):
            worker.sample([ImageRequest(prompt="x", seed=0, noise_seed=0)],
                          SamplerSettings(num_steps=3, noise_level=1.5, stochastic="all", sde="cps"))
    finally:
        worker.shutdown()
    return gen + edits


def test_cps_rescoring_matches_the_sampler_and_the_first_ratio_is_one(ray_cluster, tiny_models, cps_samples):
    from learners.group import LearnerGroup

    group = LearnerGroup("diffusion", 1, num_cpus_per=1, name_prefix="test-diffusion-cps",
                         model_path=str(tiny_models.flux), sde="cps", **COMMON)
    try:
        recomputed = group.call_rank0("compute_log_probs", cps_samples)
        metrics = group.train_step(cps_samples, ADVANTAGES)
    finally:
        group.shutdown()
    for sample, new in zip(cps_samples, recomputed, strict=True):
        assert len(new) == len(sample.log_probs) == 2
        for old, lp in zip(sample.log_probs.tolist(), new, strict=True):
            assert abs(math.exp(lp - old) - 1.0) < 1e-5
    assert abs(metrics["ratio_min"] - 1) < 1e-5 and abs(metrics["ratio_max"] - 1) < 1e-5
    assert metrics["clip_frac"] == 0 and metrics["num_steps"] == 8
    assert metrics["pg_loss"] == pytest.approx(-sum(ADVANTAGES) / 4, abs=1e-6)


def test_rescoring_cps_samples_with_flow_grpo_step_differs(ray_cluster, tiny_models, cps_samples):
    from learners.group import LearnerGroup

    group = LearnerGroup("diffusion", 1, num_cpus_per=1, name_prefix="test-diffusion-cps-mismatch",
                         model_path=str(tiny_models.flux), sde="flow_grpo", **{**COMMON, "kl_coef": 0.0})
    try:
        recomputed = group.call_rank0("compute_log_probs", cps_samples[:1])
    finally:
        group.shutdown()
    gaps = [abs(lp - old) for old, lp in zip(cps_samples[0].log_probs.tolist(), recomputed[0], strict=True)]
    assert max(gaps) > 1e-2
