"""DiffusionWorker on the tiny FLUX.1-Kontext-style pipeline: ODE = pipeline, log-probs, edit, errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from rollout.flow_sde import sde_step
from rollout.flux_forward import flux_velocity
from rollout.interfaces import Generator, ImageRequest, SamplerSettings

pytestmark = pytest.mark.integration

H = W = 64
MAX_SEQ = 128
ODE = SamplerSettings(num_steps=6, noise_level=0.0, stochastic="all", height=H, width=W, guidance=3.5)
SDE = SamplerSettings(num_steps=6, noise_level=0.7, stochastic="all", height=H, width=W, guidance=3.5)


@pytest.fixture(scope="module")
def worker(tiny_models) -> Iterator:
    from actors.diffusion_worker import DiffusionWorker

    w = DiffusionWorker(str(tiny_models.flux), name="test-diffusion", max_sequence_length=MAX_SEQ)
    yield w
    w.shutdown()


@pytest.fixture(scope="module")
def sources(make_image) -> list[np.ndarray]:
    return [make_image(11, H, W), make_image(12, H, W)]


def _pipeline(worker, prompts, noise_seeds, images=None):
    """The diffusers pipeline's own call, with the sizes pinned (no resizing: height, width, max_area)."""
    from PIL import Image

    gens = [torch.Generator().manual_seed(s) for s in noise_seeds]
    kwargs = {} if images is None else {"image": [Image.fromarray(i) for i in images]}
    return worker.pipe(
        prompt=prompts, height=H, width=W, max_area=H * W, _auto_resize=False, num_inference_steps=ODE.num_steps,
        guidance_scale=ODE.guidance, generator=gens, output_type="np", max_sequence_length=MAX_SEQ,
        **kwargs,
    ).images  # fmt: skip


def _ours(worker, requests, settings, generator_seeds=None, **kwargs):
    prompt_embeds, pooled = worker.encode([r.prompt for r in requests])
    latents, source = worker.initial_latents(requests, H, W)
    gens = [torch.Generator().manual_seed(s) for s in (generator_seeds or [r.seed for r in requests])]
    result = worker.denoise(latents, prompt_embeds, pooled, settings, gens, source, **kwargs)
    return result, (prompt_embeds, pooled)


@pytest.mark.parametrize("edit", [False, True], ids=["generate", "edit"])
def test_ode_loop_reproduces_the_pipeline(worker, sources, edit):
    prompts = ["a red circle", "two blue squares"]
    images = sources if edit else None
    requests = [
        ImageRequest(prompt=p, seed=i, noise_seed=7 + i, source_image=None if images is None else images[i])
        for i, p in enumerate(prompts)
    ]
    ours, _ = _ours(worker, requests, ODE)
    ref_images = _pipeline(worker, prompts, [7, 8], images)
    assert np.abs(worker.decode(ours.latents, H, W) - ref_images).max() < 1e-5
    sampled = worker.sample(requests, ODE)
    expected = (ref_images * 255).round().astype(np.uint8)
    assert all(np.array_equal(s.image, e) for s, e in zip(sampled, expected, strict=True))


def test_sampler_log_probs_equal_recomputation_at_stored_latents(worker, sources):
    requests = [
        ImageRequest(prompt="a red circle", seed=1, noise_seed=3),
        ImageRequest(prompt="make it green", seed=2, noise_seed=3, source_image=sources[0]),
        ImageRequest(prompt="two blue squares", seed=3, noise_seed=4),
    ]
    samples = worker.sample(requests, SDE)
    sigmas = worker.sigmas(SDE.num_steps, 16)
    for request, s in zip(requests, samples, strict=True):
        steps = SDE.num_steps - 1
        assert s.image.shape == (H, W, 3) and s.image.dtype == np.uint8
        assert s.latents.shape == s.next_latents.shape == (steps, 16, 64)
        assert s.step_indices.tolist() == list(range(steps))
        np.testing.assert_array_equal(s.sigmas, sigmas[:steps].numpy())
        np.testing.assert_array_equal(s.sigmas_next, sigmas[1 : steps + 1].numpy())
        np.testing.assert_array_equal(s.latents[1:], s.next_latents[:-1])  # consecutive steps
        assert s.prompt_embeds.shape == (MAX_SEQ, 32) and s.pooled_embeds.shape == (32,)
        assert (s.source_latents is None) == (request.source_image is None)
        assert s.noise_level == SDE.noise_level and s.guidance == SDE.guidance and s.seed == request.seed
        src = (
            None
            if s.source_latents is None
            else torch.from_numpy(s.source_latents)[None].expand(steps, -1, -1)
        )
        latents = torch.from_numpy(s.latents)
        with torch.no_grad():
            velocity = flux_velocity(
                worker.transformer, latents, torch.from_numpy(s.sigmas),
                torch.from_numpy(s.prompt_embeds)[None].expand(steps, -1, -1),
                torch.from_numpy(s.pooled_embeds)[None].expand(steps, -1), s.guidance, H, W, src,
            )  # fmt: skip
        rescored = sde_step(
            velocity,
            torch.from_numpy(s.sigmas),
            torch.from_numpy(s.sigmas_next),
            latents,
            s.noise_level,
            prev_sample=torch.from_numpy(s.next_latents),
        )
        assert (rescored.log_prob - torch.from_numpy(s.log_probs)).abs().max().item() < 1e-6


def test_edit_is_conditioned_on_the_source_image(worker, sources):
    # The random tiny transformer mixes source tokens in weakly, so compare latents, not just pixels.
    requests = [
        ImageRequest(prompt="make it green", seed=5, noise_seed=9, source_image=img) for img in sources
    ]
    requests.append(ImageRequest(prompt="make it green", seed=5, noise_seed=9))  # same, no source
    a, b, plain = worker.sample(requests, SDE)
    assert not np.array_equal(a.image, b.image)
    assert np.abs(a.next_latents[-1] - b.next_latents[-1]).mean() > 1e-3
    assert np.abs(a.next_latents[-1] - plain.next_latents[-1]).mean() > 1e-3
    assert np.abs(a.source_latents - b.source_latents).mean() > 0.1


def test_one_stochastic_step_leaves_every_other_step_deterministic(worker):
    one = dataclasses.replace(SDE, stochastic="one", window_lo=1, window_hi=5)
    none = dataclasses.replace(SDE, stochastic="none")
    request = [ImageRequest(prompt="a yellow star", seed=0, noise_seed=21)]
    ode, _ = _ours(worker, request, none, return_trace=True)
    finals = []
    for seed in (0, 1, 2, 3):
        run, (prompt_embeds, pooled) = _ours(worker, request, one, [seed], return_trace=True)
        (record,) = run.records[0]
        k, trace = record[0], run.trace[0]
        assert 1 <= k < 5
        assert torch.equal(trace[: k + 1], ode.trace[0, : k + 1])  # ODE (shared noise) up to step k
        assert not torch.equal(trace[k + 1], ode.trace[0, k + 1])  # the one SDE step
        assert torch.equal(record[1], trace[k]) and torch.equal(record[2], trace[k + 1])
        rest = worker.denoise(
            trace[k + 1][None], prompt_embeds, pooled, none, [torch.Generator()], start_step=k + 1
        )
        assert torch.equal(rest.latents[0], trace[-1])  # deterministic after step k
        finals.append(trace[-1])
    assert not torch.equal(finals[0], finals[1])
    samples = worker.sample([dataclasses.replace(request[0], seed=s) for s in (0, 1)], one)
    assert all(len(s.log_probs) == 1 and s.latents.shape == (1, 16, 64) for s in samples)


@pytest.mark.parametrize(
    "requests, settings, match",
    [
        ([], SDE, "non-empty list"),
        (["a prompt"], SDE, "expected ImageRequest"),
        ([ImageRequest("p", 0, 0, np.zeros((H, W, 3), np.float32))], SDE, "uint8 RGB array"),
        ([ImageRequest("p", 0, 0, np.zeros((32, 32, 3), np.uint8))], SDE, "shape \\(64, 64, 3\\)"),
        ([ImageRequest("p", 0, 0, np.zeros((H, W), np.uint8))], SDE, "uint8 RGB array"),
        ([ImageRequest("p", 0, 0, np.zeros((H, W, 4), np.uint8))], SDE, "uint8 RGB array"),
        (
            [ImageRequest("p", 0, 0)],
            dataclasses.replace(SDE, stochastic="one", window_lo=3, window_hi=3),
            "window",
        ),
        (
            [ImageRequest("p", 0, 0)],
            dataclasses.replace(SDE, stochastic="one", window_lo=0, window_hi=7),
            "window",
        ),
        ([ImageRequest("p", 0, 0)], dataclasses.replace(SDE, stochastic="one", window_lo=-1), "window"),
        ([ImageRequest("p", 0, 0)], dataclasses.replace(SDE, stochastic="some"), "stochastic"),
        ([ImageRequest("p", 0, 0)], dataclasses.replace(SDE, num_steps=0), "num_steps"),
        ([ImageRequest("p", 0, 0)], dataclasses.replace(SDE, height=40), "multiple of 16"),
        ([ImageRequest("p", 0, 0)], dataclasses.replace(SDE, noise_level=-0.1), "noise_level"),
    ],
)
def test_bad_inputs_raise_and_leave_the_worker_usable(worker, requests, settings, match):
    with pytest.raises(ValueError, match=match):
        worker.sample(requests, settings)
    (ok,) = worker.sample([ImageRequest("ok", 0, 0)], dataclasses.replace(SDE, num_steps=2))
    assert ok.image.shape == (H, W, 3)


def test_load_weights_changes_outputs_and_restores_them(worker, tiny_models, perturb_weights, tmp_path):
    request = [ImageRequest(prompt="a red circle", seed=0, noise_seed=1)]
    before = worker.sample(request, ODE)[0].image
    perturbed = perturb_weights(tiny_models.flux / "transformer", tmp_path / "perturbed", std=0.1)
    assert worker.load_weights(3, str(perturbed)) == 3 and worker.version() == 3
    changed = worker.sample(request, ODE)[0]
    assert changed.weight_version == 3 and not np.array_equal(changed.image, before)
    worker.load_weights(0, str(tiny_models.flux))  # a pipeline folder: uses transformer/
    assert np.array_equal(worker.sample(request, ODE)[0].image, before)
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        worker.load_weights(4, str(tmp_path / "missing"))
    assert worker.version() == 0


def test_worker_contract_and_stats(worker):
    assert isinstance(worker, Generator)
    worker.set_version(0)
    health, stats = worker.health(), worker.stats()
    assert health["ok"] and health["version"] == 0 and health["name"] == "test-diffusion"
    assert stats["images"] > 0 and stats["images_per_s"] > 0 and stats["engine_start_s"] > 0


def test_remote_worker_samples_like_the_local_one(ray_cluster, tiny_models, worker):
    import ray

    from actors.diffusion_worker import remote_diffusion_worker

    handle = remote_diffusion_worker(
        7, num_cpus=1, num_gpus=0, model_path=str(tiny_models.flux), max_sequence_length=MAX_SEQ
    )
    try:
        assert ray.get_actor("diffusion-worker-7") is not None
        requests = [ImageRequest(prompt="a red circle", seed=4, noise_seed=2)]
        remote = ray.get(handle.sample.remote(requests, SDE))[0]
        local = worker.sample(requests, SDE)[0]
        assert np.abs(remote.image.astype(int) - local.image.astype(int)).max() <= 1
        np.testing.assert_allclose(remote.log_probs, local.log_probs, atol=1e-5)
        assert ray.get(handle.health.remote())["name"] == "diffusion-worker-7"
        with pytest.raises(ray.exceptions.RayTaskError, match="non-empty list"):
            ray.get(handle.sample.remote([], SDE))
        assert ray.get(handle.version.remote()) == 0  # still alive after a bad request
        ray.get(handle.shutdown.remote())
    finally:
        ray.kill(handle)
