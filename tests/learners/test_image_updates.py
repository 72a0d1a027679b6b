"""The generator learner's DiffusionNFT objective, several updates per batch and EMA, through real
DeepSpeed (gloo, CPU) in Ray actors on the tiny FLUX.1-Kontext, with ODE rollouts of the real worker.

Shows: NFT trains on the rollouts' final latents (no stored steps); in its first update v_θ = v_old,
so the positive and negative losses are equal and mean((v_θ − v_old)²) is exactly 0, and in the
second it is not; FlowGRPO's second update has ratio != 1 and logs its clip fraction; the EMA follows
ema = d·ema + (1 − d)·θ (checksums), survives a checkpoint round trip, and its swap-in is what a
weight sync sends (and swapping out restores the live weights bit for bit).
"""

from __future__ import annotations

import dataclasses
import math

import pytest

pytestmark = pytest.mark.integration

ADVANTAGES = [1.0, -1.0, 0.5, -0.5]
COMMON = dict(lr=1e-3, adam_eps=1e-6, warmup_steps=0, grad_clip=1.0, image_loss_weight=1.0, dtype="float32",
              zero_stage=0, micro_batch_size=4)


@pytest.fixture(scope="module")
def ode_samples(tiny_models) -> list:
    """4 ODE images (2 generations, 2 edits) with training data: final latents, no stored steps."""
    from actors.diffusion_worker import DiffusionWorker
    from rollout.interfaces import ImageRequest, SamplerSettings

    worker = DiffusionWorker(str(tiny_models.flux))
    try:
        settings = SamplerSettings(num_steps=4, noise_level=0.0, stochastic="none", guidance=3.5, height=64, width=64)
        gen = worker.sample([ImageRequest(prompt=f"a red circle {i}", seed=i, noise_seed=0) for i in range(2)],
                            settings)
        edits = worker.sample([ImageRequest(prompt="make it blue", seed=10 + i, noise_seed=1,
                                            source_image=gen[i].image) for i in range(2)], settings)
    finally:
        worker.shutdown()
    return gen + edits


@pytest.fixture(scope="module")
def sde_samples(tiny_models) -> list:
    from actors.diffusion_worker import DiffusionWorker
    from rollout.interfaces import ImageRequest, SamplerSettings

    worker = DiffusionWorker(str(tiny_models.flux))
    try:
        settings = SamplerSettings(num_steps=4, noise_level=0.7, stochastic="all", guidance=3.5, height=64, width=64)
        return worker.sample([ImageRequest(prompt=f"a red circle {i}", seed=i, noise_seed=0) for i in range(4)],
                             settings)
    finally:
        worker.shutdown()


def _group(tiny_models, name: str, **kwargs):
    from learners.group import LearnerGroup

    return LearnerGroup("diffusion", 1, num_cpus_per=1, name_prefix=f"test-image-updates-{name}",
                        model_path=str(tiny_models.flux), **COMMON, **kwargs)


def test_ode_samples_carry_final_latents(ode_samples):
    for s in ode_samples:
        assert s.final_latents is not None and s.final_latents.ndim == 2  # (L, C) packed tokens
        assert len(s.log_probs) == 0


def test_nft_two_updates(ray_cluster, tiny_models, ode_samples):
    group = _group(tiny_models, "nft", algorithm="nft", updates_per_batch=2, nft_beta=1.0, nft_timesteps=2,
                   kl_coef=0.05, kl_mode="velocity")
    try:
        before = group.call_rank0("state_dict_checksum")
        m = group.train_step(ode_samples, ADVANTAGES)
        after = group.call_rank0("state_dict_checksum")
    finally:
        group.shutdown()
    assert m["updates"] == 2 and m["version"] == 1 and m["num_steps"] == 8  # 4 images x 2 noise levels
    assert m["u0/nft_old_deviate"] == 0.0  # v_θ = v_old before the first update (β = 1: v⁺ = v⁻ exactly)
    assert m["u1/nft_old_deviate"] > 0.0
    assert m["u0/nft_positive_loss"] == m["u0/nft_negative_loss"]
    assert m["u1/nft_positive_loss"] != m["u1/nft_negative_loss"]
    assert math.isfinite(m["loss"]) and m["skipped_nonfinite"] == 0
    assert after != before


def test_flow_grpo_second_update_ratio_and_clip_fraction(ray_cluster, tiny_models, sde_samples):
    group = _group(tiny_models, "grpo", updates_per_batch=2, clip_range=0.01, kl_coef=0.0)
    try:
        m = group.train_step(sde_samples, ADVANTAGES)
    finally:
        group.shutdown()
    assert abs(m["u0/ratio_min"] - 1) < 1e-5 and abs(m["u0/ratio_max"] - 1) < 1e-5
    assert m["u0/clip_frac"] == 0.0
    assert abs(m["u1/ratio_mean"] - 1) > 1e-4 or abs(m["u1/ratio_max"] - m["u1/ratio_min"]) > 1e-4
    assert "u1/clip_frac" in m and 0.0 <= m["u1/clip_frac"] <= 1.0
    assert m["version"] == 1


def test_ema_math_checkpoint_and_eval_weights(ray_cluster, tiny_models, ode_samples, tmp_path):
    import ray

    from cluster.eval import files_tensor_sums
    from learners.checkpointing import load_learner_state, parameters_sha256, save_learner_state

    group = _group(tiny_models, "ema", algorithm="nft", ema_decay=0.5, kl_coef=0.0)
    restored = None
    try:
        sums = [group.call_rank0("state_dict_checksum")]
        assert group.call_rank0("ema_checksum") == pytest.approx(sums[0], rel=1e-9)  # starts at the weights
        for version in range(2):  # on-policy: each batch drawn by the weights of that version
            group.train_step([dataclasses.replace(x, weight_version=version) for x in ode_samples], ADVANTAGES)
            sums.append(group.call_rank0("state_dict_checksum"))
        ema = group.call_rank0("ema_checksum")
        # decay 0.5 warmed up: min(0.5, 1/10) = 0.1 at the first update, min(0.5, 2/11) at the second
        d0, d1 = 0.1, 2 / 11
        expected = d1 * (d0 * sums[0] + (1 - d0) * sums[1]) + (1 - d1) * sums[2]
        assert ema == pytest.approx(expected, rel=1e-6, abs=1e-6)
        assert abs(ema - sums[2]) > 1e-6

        # what a sync sends while the EMA is swapped in, and the live weights back after
        live_sha = ray.get(group.actors[0].__ray_call__.remote(parameters_sha256))
        assert group.call_rank0("ema_swap_in") is True
        swapped = group.call_rank0("state_dict_checksum")
        group.call_rank0("ema_swap_out")
        assert swapped == pytest.approx(ema, rel=1e-9)
        assert ray.get(group.actors[0].__ray_call__.remote(parameters_sha256)) == live_sha

        ray.get(group.actors[0].__ray_call__.remote(save_learner_state, str(tmp_path / "ck")))
        files = files_tensor_sums(tmp_path / "ck" / "ema_weights")
        assert sum(v[0] for v in files.values()) == pytest.approx(ema, rel=1e-6)

        restored = _group(tiny_models, "ema-restored", algorithm="nft", ema_decay=0.5, kl_coef=0.0)
        ray.get(restored.actors[0].__ray_call__.remote(load_learner_state, str(tmp_path / "ck")))
        assert restored.call_rank0("ema_checksum") == ema
        assert ray.get(restored.actors[0].__ray_call__.remote(lambda learner: learner._ema_updates)) == 2  # warm-up goes on
        assert ray.get(restored.actors[0].__ray_call__.remote(parameters_sha256)) == live_sha
    finally:
        group.shutdown()
        if restored is not None:
            restored.shutdown()
