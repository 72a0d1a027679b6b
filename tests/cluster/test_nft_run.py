"""DiffusionNFT end to end on a real local cluster: ODE rollouts, two updates per batch, an EMA for
evaluation, one-step-off rollouts, checkpoint and exact resume.

The tiny VLM judge's scores are noise, which gives every group reward spread (an exact judge scores
random images alike: zero advantages, no update). The resumed step trains on the rollout that the
checkpoint holds (one-step-off), so its update is comparable bit for bit.
"""

import math

import pytest

from cluster.config import load_config
from cluster.driver import Trainer, make_run_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NFT = ("flow_grpo.algorithm=nft", "flow_grpo.share_group_noise=false", "flow_grpo.updates_per_batch=2", "flow_grpo.ema_decay=0.5",
       "flow_grpo.nft_timesteps=1", "train.async_one_step_off=true")


def _cfg(root, name, *extra):
    return load_config("configs/cpu_tiny.yaml", [
        f"train.run_dir={root}", f"train.run_name={name}", "data.eval_limit=2", "cluster.text_workers=1",
        "r3.group_size=4", "r3.prompts_per_step=2", "train.steps=3", "train.eval_rounds=1", "logging.progress=false",
        "logging.tensorboard=false", *NFT, *extra,
    ])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    import ray

    from cluster.session import connect_ray

    path = tmp_path_factory.mktemp("nft")
    assert connect_ray(_cfg(path, "x"))
    yield path
    ray.shutdown()


def _learner(trainer, method):
    """A method of the diffusion learner (rank 0); functions sent to actors must be importable there."""
    import ray

    from learners.checkpointing import parameters_sha256

    actor = trainer.roles.diffusion_learners.actors[0]
    ref = actor.__ray_call__.remote(parameters_sha256) if method == "sha" else getattr(actor, method).remote()
    return ray.get(ref)


def _worker_sum(trainer):
    import ray

    from cluster.eval import _diffusion_engine_sums

    sums = ray.get(trainer.roles.diffusion_pool.actors[0].__ray_call__.remote(_diffusion_engine_sums))
    return sum(v[0] for v in sums.values())


def test_nft_trains_evaluates_with_the_ema_and_resumes_exactly(root, monkeypatch):
    import rollout.evaluation

    cfg = _cfg(root, "a")
    t = Trainer(cfg, make_run_dir(cfg))
    try:
        start = _learner(t, "sha")
        rows = [t.step(), t.step()]
        ckpt = t.save_checkpoint()
        rows.append(t.step())
        live, ema = _learner(t, "sha"), _learner(t, "ema_checksum")
        live_sum = _learner(t, "state_dict_checksum")
        assert _worker_sum(t) == pytest.approx(live_sum, rel=1e-6)
        seen, real = [], rollout.evaluation.evaluate

        def spy(*args, **kwargs):  # what the workers hold while the evaluation runs
            seen.append(_worker_sum(t))
            return real(*args, **kwargs)

        monkeypatch.setattr(rollout.evaluation, "evaluate", spy)
        t.evaluate("with-ema")
        assert seen == [pytest.approx(ema, rel=1e-6)]  # the EMA weights
        assert _learner(t, "sha") == live  # the live weights are back on the learner ...
        assert _worker_sum(t) == pytest.approx(live_sum, rel=1e-6)  # ... and on the workers
    finally:
        t.close()
    assert live != start
    assert abs(ema - live_sum) > 1e-6  # the EMA is not the live weights
    assert (t.run_dir / "eval-with-ema" / "eval.json").is_file()
    trained = [i for i, r in enumerate(rows) if "diffusion_learner/updates" in r]  # steps with an image batch
    assert 0 in trained and len(trained) >= 2, [sorted(r) for r in rows]
    for i in trained:
        r = rows[i]
        assert r["diffusion_learner/updates"] == 2 and math.isfinite(r["diffusion_learner/loss"])
        assert r["diffusion_learner/skipped_nonfinite"] == 0
        assert r["diffusion_learner/u1/nft_old_deviate"] > 0  # the second update moved away from v_old
    # step 0: drawn by the live weights, so v_θ = v_old in its first update: v⁺ = v⁻ (β = 1) and no deviation
    first = rows[0]
    assert first["diffusion_learner/u0/nft_old_deviate"] == 0.0
    assert first["diffusion_learner/u0/nft_positive_loss"] == first["diffusion_learner/u0/nft_negative_loss"]
    # later steps (one-step-off): drawn by the previous version, so v_old is the kept snapshot, not v_θ
    for i in trained[1:]:
        assert rows[i]["version/max_staleness"] == 1 and rows[i]["diffusion_learner/u0/nft_old_deviate"] > 0
    assert (ckpt / "diffusion_learner" / "ema_weights").is_dir()

    cfg2 = _cfg(root, "b")
    t2 = Trainer(cfg2, make_run_dir(cfg2))
    try:
        t2.load_checkpoint(ckpt)
        t2.step()
        assert _learner(t2, "sha") == live  # bitwise: the snapshot of version 1 and the EMA were restored
        assert _learner(t2, "ema_checksum") == ema
    finally:
        t2.close()
