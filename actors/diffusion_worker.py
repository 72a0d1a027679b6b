"""DiffusionWorker: hosts the FLUX.1-Kontext-style generator/editor and samples with FlowGRPO's SDE.

The pipeline supplies the text encoders, the VAE, latent preparation and its scheduler's config;
the denoising loop is our own so that every stochastic step records what the learner needs to
recompute its log-probability: the latents before and after the step, the sigmas, the text
conditioning and the source-image latents (docs/design.md#what-the-sampler-stores). The velocity comes from
`rollout.flux_forward.flux_velocity` and the step from `rollout.flow_sde.sde_step` (or `cps_step`,
`SamplerSettings.sde`), the same functions the diffusion learner calls. With noise level 0 the loop reproduces
`FluxKontextPipeline.__call__` exactly in fp32 (tested); latents stay fp32 between steps whatever
the weights' dtype (the pipeline keeps them in the weights' dtype, so bf16 runs differ slightly).

Lifecycle: construct (loads the pipeline) -> `sample` -> `load_weights`/`receive_weights` bump
the version -> `shutdown`. Plain class; `remote_diffusion_worker` wraps it as a named Ray actor.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from actors.diffusion_checks import check_image_requests, check_scheduler_config
from actors.weight_receiver import TorchWeightReceiver
from rollout.flow_sde import (
    calculate_shift,
    get_sde_step,
    sde_step,
    sigma_schedule,
    stochastic_step_indices,
)
from rollout.flux_forward import flux_velocity, unpack_latents
from rollout.interfaces import ImageRequest, SamplerSettings
from rollout.trajectory import ImageSample

__all__ = ["DiffusionWorker", "Denoised", "remote_diffusion_worker"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Denoised(NamedTuple):
    """Output of `DiffusionWorker.denoise` for a batch of B samples with L latent tokens.

    latents: (B, L, C) fp32 final packed latents.
    records: per sample, a list of (step index, latent before, latent after, σ, σ', log-prob),
        the latents (L, C) and the log-prob 0-dim fp32 tensors.
    trace: (B, steps + 1 − start_step, L, C) every intermediate latent, or None.
    """

    latents: torch.Tensor
    records: list[list[tuple[int, torch.Tensor, torch.Tensor, float, float, torch.Tensor]]]
    trace: torch.Tensor | None


class DiffusionWorker(TorchWeightReceiver):
    """Generator + editor with a FlowGRPO SDE sampler (implements `rollout.interfaces.Generator`).

    Args:
        model_path: folder of a `FluxKontextPipeline` (`save_pretrained` layout).
        device: torch device, e.g. "cpu" or "cuda".
        dtype: "float32", "bfloat16" or "float16" for the pipeline's weights (the SDE math is
            always fp32).
        seed: global torch seed set at start (sampling itself is seeded per request).
        name: the worker's name in logs and stats (the Ray actor name).
        max_sequence_length: T5 tokens per prompt (prompt_embeds are (T, D) with T = this).
    """

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        seed: int = 0,
        name: str = "diffusion-worker-0",
        max_sequence_length: int = 128,
    ) -> None:
        from diffusers import FluxKontextPipeline

        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(_DTYPES)}")
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512], got {max_sequence_length}")
        start = time.perf_counter()
        torch.manual_seed(seed)
        self.name = name
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        self.max_sequence_length = max_sequence_length
        self.pipe = FluxKontextPipeline.from_pretrained(str(model_path), dtype=self.dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.transformer = self.pipe.transformer.eval()
        check_scheduler_config(self.pipe.scheduler.config)
        self._version = 0
        self._closed = False
        self._engine_start_s = time.perf_counter() - start
        self._images = 0
        self._sample_s = 0.0
        self._last_batch_s = 0.0
        logger.info("%s: pipeline from %s ready in %.2f s", name, model_path, self._engine_start_s)

    # ------------------------------------------------------------------------------- public

    def sample(self, requests: list[ImageRequest], settings: SamplerSettings) -> list[ImageSample]:
        """One `ImageSample` per request, in request order; generate and edit may be mixed.

        Raises:
            ValueError: empty batch, a request that is not an ImageRequest, a source image that
                is not (height, width, 3) uint8, or bad settings (steps, window, sizes).
        """
        self._check_open()
        check_image_requests(requests, settings)
        start = time.perf_counter()
        out: list[ImageSample | None] = [None] * len(requests)
        for is_edit in (False, True):  # edit batches carry source tokens: run them separately
            idx = [i for i, r in enumerate(requests) if (r.source_image is not None) == is_edit]
            if idx:
                for i, sample in zip(
                    idx, self._sample_batch([requests[i] for i in idx], settings), strict=True
                ):
                    out[i] = sample
        self._last_batch_s = time.perf_counter() - start
        self._sample_s += self._last_batch_s
        self._images += len(requests)
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text conditioning: prompt_embeds (B, T, D) and pooled_embeds (B, P)."""
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        return prompt_embeds, pooled

    def _uncond_embeds(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's embeddings (the unconditional branch of CFG), repeated `batch` times."""
        embeds, pooled = self.encode([""])
        return embeds.expand(batch, -1, -1), pooled.expand(batch, -1)

    @torch.no_grad()
    def initial_latents(
        self, requests: list[ImageRequest], height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Packed initial noise (B, L, C) from each request's `noise_seed`, and packed source
        latents (B, Ls, C) when the requests are edits (else None). Same calls as the pipeline."""
        from PIL import Image

        gens = [torch.Generator("cpu").manual_seed(int(r.noise_seed)) for r in requests]
        image = None
        if requests[0].source_image is not None:
            pils = [Image.fromarray(r.source_image) for r in requests]
            image = self.pipe.image_processor.resize(pils, height, width)
            image = self.pipe.image_processor.preprocess(image, height, width)  # (B, 3, H, W)
        channels = self.transformer.config.in_channels // 4
        latents, source, _, _ = self.pipe.prepare_latents(
            image, len(requests), channels, height, width, self.dtype, self.device, gens
        )
        return latents, source

    def sigmas(self, num_steps: int, image_seq_len: int) -> torch.Tensor:
        """(num_steps + 1,) fp32 grid of the pipeline's scheduler, ending in 0."""
        cfg = self.pipe.scheduler.config
        if cfg.use_dynamic_shifting:
            mu = calculate_shift(
                image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
            )
            return sigma_schedule(num_steps, mu=mu)
        return sigma_schedule(num_steps, shift=cfg.shift)

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_embeds: torch.Tensor,
        settings: SamplerSettings,
        generators: list[torch.Generator],
        source_latents: torch.Tensor | None = None,
        *,
        start_step: int = 0,
        return_trace: bool = False,
    ) -> Denoised:
        """Run steps `start_step..num_steps-1` of the SDE/ODE sampler from packed `latents`.

        `generators[b]` draws sample b's stochastic steps (`settings.stochastic`) and then its
        SDE noise, so a sample's randomness does not depend on the rest of the batch.
        """
        batch, seq_len, _ = latents.shape
        n = settings.num_steps
        sigmas = self.sigmas(n, seq_len).tolist()
        chosen = [
            set(stochastic_step_indices(settings.stochastic, n, settings.window_lo, settings.window_hi, g))
            for g in generators
        ]
        guidance = settings.guidance if self.transformer.config.guidance_embeds else None
        records: list[list[Any]] = [[] for _ in range(batch)]
        x = latents.float()
        trace = [x] if return_trace else None
        uncond = self._uncond_embeds(batch) if settings.cfg_scale != 1.0 else None
        stochastic_step = get_sde_step(settings.sde)
        for i in range(start_step, n):
            velocity = flux_velocity(
                self.transformer, x, sigmas[i], prompt_embeds, pooled_embeds, guidance,
                settings.height, settings.width, source_latents,
                vae_scale_factor=self.pipe.vae_scale_factor,
            )  # fmt: skip
            if uncond is not None:  # the learner's `_guided` recomputes exactly this (same source, same scale)
                v_u = flux_velocity(
                    self.transformer, x, sigmas[i], uncond[0], uncond[1], guidance,
                    settings.height, settings.width, source_latents,
                    vae_scale_factor=self.pipe.vae_scale_factor,
                )  # fmt: skip
                velocity = v_u + settings.cfg_scale * (velocity - v_u)
            active = [i in steps for steps in chosen]
            if any(active) and settings.noise_level > 0:
                level = torch.tensor([settings.noise_level if a else 0.0 for a in active], device=x.device)
                noise = torch.zeros_like(x)
                for b in (b for b in range(batch) if active[b]):
                    noise[b] = torch.randn(x.shape[1:], generator=generators[b]).to(x.device)
                step = stochastic_step(velocity, sigmas[i], sigmas[i + 1], x, level, noise=noise)
            else:
                step = sde_step(velocity, sigmas[i], sigmas[i + 1], x, 0.0)
            for b in (b for b in range(batch) if active[b]):
                records[b].append((i, x[b], step.prev_sample[b], sigmas[i], sigmas[i + 1], step.log_prob[b]))
            x = step.prev_sample
            if trace is not None:
                trace.append(x)
        return Denoised(x, records, torch.stack(trace, dim=1) if trace is not None else None)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> np.ndarray:
        """Packed latents (B, L, C) -> float images (B, H, W, 3) in [0, 1], as the pipeline does."""
        vae = self.pipe.vae
        z = unpack_latents(latents, height, width, self.pipe.vae_scale_factor)
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="np")

    def load_weights(self, version: int, weights_path: str) -> int:
        """Load transformer weights (safetensors, diffusers names) from a folder; hold `version`.

        `weights_path` is a transformer folder (`save_pretrained` output, sharded or not) or a
        pipeline folder with a `transformer/` subfolder.
        """
        from safetensors.torch import load_file

        self._check_open()
        path = Path(weights_path)
        if (path / "transformer").is_dir():
            path = path / "transformer"
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            raise ValueError(f"no *.safetensors files in {weights_path!r}; pass a transformer folder")
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))
        expected = set(self.transformer.state_dict())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"weights in {weights_path!r} do not match the transformer: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
        self.transformer.load_state_dict(state, strict=True)
        self._version = int(version)
        logger.info("%s: loaded weights version %d from %s", self.name, self._version, weights_path)
        return self._version

    def version(self) -> int:
        return self._version

    def set_version(self, version: int) -> None:
        self._version = int(version)

    def health(self) -> dict[str, Any]:
        return {
            "ok": not self._closed,
            "name": self.name,
            "version": self._version,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def stats(self) -> dict[str, Any]:
        """Throughput since start: images, images/s over time spent in `sample`, engine start s."""
        return {
            "name": self.name,
            "images": self._images,
            "images_per_s": self._images / self._sample_s if self._sample_s > 0 else 0.0,
            "sample_s": self._sample_s,
            "last_batch_s": self._last_batch_s,
            "engine_start_s": self._engine_start_s,
        }

    def shutdown(self) -> None:
        """Release the pipeline; later calls raise RuntimeError."""
        if self._closed:
            return
        self._closed = True
        self.pipe = None
        self.transformer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("%s: shut down", self.name)

    # ------------------------------------------------------------------------------ private

    def _sample_batch(self, requests: list[ImageRequest], settings: SamplerSettings) -> list[ImageSample]:
        height, width = settings.height, settings.width
        prompt_embeds, pooled = self.encode([r.prompt for r in requests])
        latents, source = self.initial_latents(requests, height, width)
        generators = [torch.Generator("cpu").manual_seed(int(r.seed)) for r in requests]
        result = self.denoise(latents, prompt_embeds, pooled, settings, generators, source)
        images = self.decode(result.latents, height, width)
        images = (images * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
        sources = [None] * len(requests) if source is None else list(source)
        return [
            self._to_sample(request, settings, image, records, embeds, pool, src, final)
            for request, image, records, embeds, pool, src, final in zip(
                requests, images, result.records, prompt_embeds, pooled, sources, result.latents, strict=True
            )
        ]

    def _to_sample(self, request, settings, image, records, prompt_embeds, pooled, source, final) -> ImageSample:
        sample = ImageSample(
            image=image,
            prompt=request.prompt,
            seed=int(request.seed),
            noise_level=float(settings.noise_level),
            source_image=request.source_image,
            guidance=float(settings.guidance),
            weight_version=self._version,
        )
        if not settings.keep_training_data:
            return sample
        seq_len, channels = records[0][1].shape if records else (0, 0)
        sample.latents = _np([r[1] for r in records], (0, seq_len, channels))
        sample.next_latents = _np([r[2] for r in records], (0, seq_len, channels))
        sample.sigmas = np.asarray([r[3] for r in records], dtype=np.float32)
        sample.sigmas_next = np.asarray([r[4] for r in records], dtype=np.float32)
        sample.log_probs = _np([r[5] for r in records], (0,))
        sample.step_indices = np.asarray([r[0] for r in records], dtype=np.int64)
        sample.prompt_embeds = prompt_embeds.float().cpu().numpy()
        sample.pooled_embeds = pooled.float().cpu().numpy()
        sample.source_latents = None if source is None else source.float().cpu().numpy()
        sample.final_latents = final.float().cpu().numpy()  # (L, C), what DiffusionNFT trains on
        return sample

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} was shut down")


def remote_diffusion_worker(index: int, num_cpus: float, num_gpus: float, *, scheduling_strategy: Any = None,
                            **kwargs: Any):
    """Start `DiffusionWorker(**kwargs)` as the Ray actor `diffusion-worker-{index}`.

    `scheduling_strategy` (e.g. a `PlacementGroupSchedulingStrategy` for the actor's bundle) goes to
    Ray as is; None: plain resource request.
    """
    import ray

    name = f"diffusion-worker-{index}"
    kwargs.setdefault("name", name)
    actor_cls = ray.remote(DiffusionWorker)
    options: dict[str, Any] = {"name": name, "num_cpus": num_cpus, "num_gpus": num_gpus}
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return actor_cls.options(**options).remote(**kwargs)


# ------------------------------------------------------------------------------------ helpers


def _np(tensors: list[torch.Tensor], empty_shape: tuple[int, ...]) -> np.ndarray:
    if not tensors:
        return np.zeros(empty_shape, dtype=np.float32)
    return torch.stack(tensors).float().cpu().numpy()
