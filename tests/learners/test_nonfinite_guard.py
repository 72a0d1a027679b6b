"""The non-finite guard of the learners through real DeepSpeed (gloo, CPU) in Ray actors.

Shows: a step with a NaN advantage, or with a NaN loss in its second micro-batch (a corrupt
behaviour log-prob), leaves the weights bit-identical under ZeRO-0 (the learner's own skip) and
ZeRO-1 (DeepSpeed's), is counted (`skipped_nonfinite`, `nonfinite_advantages`, `nonfinite_loss`),
and leaves no trace: the next finite step gives the same weights and learning rate as a fresh
learner's first step. The diffusion learner refuses a +inf advantage (which its ±adv_clip would
otherwise have turned into 5).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

pytestmark = pytest.mark.integration

TEMPERATURE = 0.8
ADVANTAGES = [1.0, -0.5, 0.25, -1.0]
COMMON = dict(lr=1e-2, betas=(0.9, 0.95), adam_eps=1e-6, weight_decay=0.01, warmup_steps=2, grad_clip=1.0,
              temperature=TEMPERATURE, kl_coef=0.05, kl_kind="k3", loss_agg="token-mean", dtype="float32")


@pytest.fixture(scope="module")
def batch(tiny_models, make_text_batch) -> list:
    return make_text_batch(tiny_models.lm, TEMPERATURE, n=4, seed=0)


def _group(tiny_models, name: str, zero_stage: int):
    from learners.group import LearnerGroup

    return LearnerGroup("text", 1, num_cpus_per=1, name_prefix=name, model_path=str(tiny_models.lm),
                        zero_stage=zero_stage, micro_batch_size=2, **COMMON)


def _sha(group) -> str:
    import ray

    from learners.checkpointing import parameters_sha256

    return ray.get(group.actors[0].__ray_call__.remote(parameters_sha256))


def _state(group) -> dict[str, torch.Tensor]:
    return group.call_rank0("full_state_dict")


@pytest.fixture(scope="module")
def reference(ray_cluster, tiny_models, batch):
    """A fresh ZeRO-0 learner's first (finite) step: its metrics and weights."""
    group = _group(tiny_models, "test-nonfinite-ref", 0)
    try:
        metrics = group.train_step(batch, ADVANTAGES)
        yield metrics, _state(group)
    finally:
        group.shutdown()


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_nan_advantage_and_nan_loss_steps_leave_weights_bit_identical_and_are_counted(
        ray_cluster, tiny_models, batch, reference, zero_stage):
    group = _group(tiny_models, f"test-nonfinite-z{zero_stage}", zero_stage)
    try:
        start = _sha(group)
        m = group.train_step(batch, [1.0, math.nan, 0.25, -1.0])
        assert (m["skipped_nonfinite"], m["nonfinite_advantages"], m["nonfinite_loss"]) == (1.0, 1.0, 0.0)
        assert _sha(group) == start
        corrupt = list(batch)
        corrupt[3] = replace(batch[3], logprobs=[math.nan, *batch[3].logprobs[1:]])  # 2nd micro-batch of 2
        m = group.train_step(corrupt, ADVANTAGES)
        assert (m["skipped_nonfinite"], m["nonfinite_advantages"], m["nonfinite_loss"]) == (1.0, 0.0, 1.0)
        assert not math.isfinite(m["loss"])  # reported as it was, not hidden
        assert _sha(group) == start
        m = group.train_step(batch, ADVANTAGES)  # no trace: as a fresh learner's first update
        ref_metrics, ref_state = reference
        assert (m["skipped_nonfinite"], m["nonfinite_loss"]) == (0.0, 0.0)
        assert m["lr"] == ref_metrics["lr"] == COMMON["lr"] / COMMON["warmup_steps"]  # the schedule did not move
        assert _sha(group) != start
        state = _state(group)
        for name, value in ref_state.items():
            if zero_stage == 0:
                assert torch.equal(state[name], value), name
            else:
                torch.testing.assert_close(state[name], value, rtol=0, atol=1e-5, msg=name)
    finally:
        group.shutdown()


def test_diffusion_learner_refuses_an_infinite_advantage(ray_cluster, tiny_models):
    from actors.diffusion_worker import DiffusionWorker
    from learners.group import LearnerGroup
    from rollout.interfaces import ImageRequest, SamplerSettings

    worker = DiffusionWorker(str(tiny_models.flux))
    try:
        settings = SamplerSettings(num_steps=2, noise_level=0.7, stochastic="all", height=64, width=64)
        images = worker.sample([ImageRequest(prompt=f"a red circle {i}", seed=i, noise_seed=0) for i in range(2)],
                               settings)
    finally:
        worker.shutdown()
    group = LearnerGroup("diffusion", 1, num_cpus_per=1, name_prefix="test-nonfinite-diffusion",
                         model_path=str(tiny_models.flux), zero_stage=0, micro_batch_size=2, lr=1e-3,
                         warmup_steps=0, dtype="float32")
    try:
        start = _sha(group)
        m = group.train_step(images, [math.inf, -1.0])
        assert (m["skipped_nonfinite"], m["nonfinite_advantages"]) == (1.0, 1.0)
        assert _sha(group) == start
        m = group.train_step(images, [1.0, -1.0])
        assert m["skipped_nonfinite"] == 0.0 and _sha(group) != start
    finally:
        group.shutdown()
