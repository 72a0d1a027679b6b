"""FlowGRPO learner for the generator's flow transformer on DeepSpeed.

Design: docs/design.md#flowgrpo-for-the-generator.

Only the transformer is trained and held: `ImageSample` stores the text conditioning
(prompt_embeds, pooled_embeds) and the source-image latents, so text encoders and VAE are not
needed here. For every stored stochastic step the velocity comes from
`rollout.flux_forward.flux_velocity` and the step's log-prob / mean / std from
`rollout.flow_sde.sde_step(..., prev_sample=stored_next)` (or `cps_step`, argument `sde`): the very
functions the sampler used, so before the first update the ratio is 1.

The unit of a micro-batch is one (image, stored step) item; the loss is the mean over all items
of all ranks of the clipped surrogate plus β·KL, times the image-loss weight. KL: "mean" =
mean((μθ − μref)²)/(2·std²) on the step mean, or "velocity" = mean((vθ − vref)²) (the no-CFG
variant). Optional train-time CFG: v = v_u.detach() + s·(v_c − v_u.detach()), which is only
consistent when the sampler used the same guidance; the unconditional embeddings are passed in.
Under ZeRO-3 every rank must run the same number of forwards: keep edits and generations in
separate batches, and images of one size.

`train_step` (`learners.image_updates`) runs `updates_per_batch` updates of this objective or of
DiffusionNFT (`algorithm="nft"`, `learners.nft_math`: trains on the final latents, no stored steps)
and keeps the EMA of the weights that evaluation uses.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from learners import algos, ds_engine, finite, lean_init
from learners.image_updates import ImageUpdates
from learners.learner_base import LearnerBase
from learners.lora import LoraAdapters, lora_rank_of
from rollout.flow_sde import get_sde_step
from rollout.flux_forward import FLUX_VAE_SCALE, flux_velocity
from rollout.trajectory import ImageSample

__all__ = ["DiffusionLearner", "KL_MODES"]

log = logging.getLogger(__name__)

KL_MODES = ("mean", "velocity")


class _Item(NamedTuple):
    """One stored stochastic step of one image."""

    sample: int  # index into the step's samples
    step: int  # index into the sample's stored steps


class DiffusionLearner(ImageUpdates, LearnerBase):
    """One rank of the generator's learner group; every public call is collective over ranks."""

    def __init__(
        self,
        *,
        model_path: str,
        zero_stage: int = 1,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        adam_eps: float = 1e-8,
        warmup_steps: int = 0,
        lr_decay_steps: int = 0,
        min_lr_ratio: float = 0.0,
        grad_clip: float = 1.0,
        micro_batch_size: int = 4,
        dtype: str = "float32",
        kl_coef: float = 0.0,
        kl_mode: str = "mean",
        clip_range: float = 0.2,
        adv_clip: float = 5.0,
        image_loss_weight: float = 1.0,
        cfg_scale: float = 1.0,
        sde: str = "flow_grpo",
        gradient_checkpointing: bool = False,
        lora: dict[str, Any] | None = None,
        algorithm: str = "flow_grpo",
        updates_per_batch: int = 1,
        ema_decay: float = 0.0,
        ema_warmup: bool = True,
        nft_beta: float = 1.0,
        nft_weighting: str = "adaptive",
        nft_timesteps: int = 2,
        keep_previous_weights: bool = False,
        vae_scale_factor: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        master_addr: str | None = None,
        master_port: int | None = None,
        backend: str | None = None,
    ) -> None:
        """Load the transformer (a pipeline folder with `transformer/`, or a transformer folder).

        micro_batch_size counts (image, stored step) items. cfg_scale 1 = no train-time CFG.
        sde: the workers' stochastic step, "flow_grpo" or "cps" (`flow_grpo.sde`); rescoring with
        another one than the sampler used makes the ratio meaningless.
        vae_scale_factor: pixels per latent pixel, which fixes the token grid of an image; None
        reads it from the pipeline's `vae/config.json` (FLUX's 8 for a bare transformer folder).
        gradient_checkpointing: recompute the transformer blocks' activations in the backward pass
        (diffusers checkpoints whenever gradients are enabled, in eval mode too).
        dtype: "float32" or "bfloat16" (fp32 master weights in the optimizer; `flow_grpo.dtype`).
        lora: {rank, alpha, dropout, target_modules} (`flow_grpo.lora`); rank > 0: as `TextLearner`.
        algorithm ("flow_grpo" | "nft"), updates_per_batch, ema_decay, ema_warmup, nft_*: `learners.image_updates`;
        keep_previous_weights: rollouts may be one version stale (one-step-off), NFT keeps those weights.
        rank/world_size/master_*: as `TextLearner`.
        """
        if kl_mode not in KL_MODES:
            raise ValueError(f"unknown kl_mode {kl_mode!r}; known: {list(KL_MODES)}")
        if clip_range <= 0:
            raise ValueError(f"clip_range must be > 0, got {clip_range}")
        self._setup_dist(rank, world_size, master_addr, master_port, backend, seed)
        self.model_path = str(model_path)
        self.micro_batch_size = micro_batch_size
        self.kl_coef, self.kl_mode = kl_coef, kl_mode
        self.clip_range, self.adv_clip = clip_range, adv_clip
        self.image_loss_weight, self.cfg_scale = image_loss_weight, cfg_scale
        self.sde_step = get_sde_step(sde)
        self.dtype = ds_engine.resolve_dtype(dtype)
        self.vae_scale_factor = vae_scale_factor or _pipeline_vae_scale(Path(model_path))

        config = ds_engine.build_ds_config(
            zero_stage=zero_stage, lr=lr, betas=betas, weight_decay=weight_decay, adam_eps=adam_eps,
            grad_clip=grad_clip, micro_batch_size=micro_batch_size, world_size=self.world_size,
            dtype=self.dtype, hidden_size=self._inner_dim())
        # ---- lean loading (docs/design.md#lean-learners-under-zero-3): ZeRO-3 partitions at construction
        model = self._load_transformer(config)
        if gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.ref_model = None
        if kl_coef > 0 and not lora_rank_of(lora):  # sharded like the policy under ZeRO-3, else a whole copy
            reference = self._load_transformer(config).eval().requires_grad_(False)
            self.ref_model = (lean_init.reference_engine(reference, config) if lean_init.is_zero3(config)
                              else reference.to(self.device))
        # ---- end lean loading
        self.lora = LoraAdapters.apply(model, **lora, seed=seed) if lora_rank_of(lora) else None  # docs/design.md#lora
        self.engine = ds_engine.initialize_engine(model, config, warmup_steps, lr_decay_steps, min_lr_ratio)
        self.engine.eval()
        self.guidance_embeds = bool(self.engine.module.config.guidance_embeds)
        self._setup_updates(algorithm=algorithm, updates_per_batch=updates_per_batch, ema_decay=ema_decay,
                            ema_warmup=ema_warmup, nft_beta=nft_beta, nft_weighting=nft_weighting,
                            nft_timesteps=nft_timesteps, keep_previous_weights=keep_previous_weights, seed=seed,
                            zero_stage=zero_stage)

    # ---- public -----------------------------------------------------------------------------
    @torch.no_grad()
    def compute_log_probs(self, samples: Sequence[ImageSample], reference: bool = False,
                          negative_embeds: tuple[Any, Any] | None = None) -> list[list[float]]:
        """Recomputed log-probs of every stored step, one list per sample.

        Collective only under ZeRO-3 (as `TextLearner.compute_logprobs`).
        """
        zero3 = self.engine.zero_optimization_stage() == 3
        items = _items(samples)
        out = [[0.0] * len(s.log_probs) for s in samples]
        for sl in self._plan_micro_batches(len(items), collective=zero3):
            chunk = items[sl]
            res = self._score(samples, chunk, reference, negative_embeds, grad=False)
            for it, lp in zip(chunk, res.log_prob.tolist(), strict=True):
                out[it.sample][it.step] = lp
        return out

    def _flow_grpo_update(self, samples: Sequence[ImageSample], advantages: Sequence[float],
                          negative_embeds: tuple[Any, Any] | None = None) -> dict[str, float]:
        """One FlowGRPO update over every stored step of this rank's samples (collective; `train_step`).

        advantages: one per sample (applied to each of its steps, clipped to ±adv_clip).
        negative_embeds: (prompt_embeds (T, D), pooled (P,)) of the unconditional prompt, needed
        when cfg_scale != 1. Returns metrics reduced over all ranks; a step with non-finite advantages,
        losses or gradients makes no update (`skipped_nonfinite` 1, `learners.finite`).
        """
        if len(samples) != len(advantages):
            raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
        start = time.perf_counter()
        nonfinite_adv = self._begin_update(advantages)
        if nonfinite_adv:
            return self._refused_update(nonfinite_adv, start)
        items = _items(samples)
        micro = self._plan_micro_batches(len(items))
        normalizer = ds_engine.all_reduce_sum(len(items))
        ds_engine.set_micro_batches(self.engine, len(micro))
        scale = ds_engine.micro_loss_scale(self.engine, len(micro))
        self._lr_used = self.engine.get_lr()[0]
        adv_all = torch.tensor(list(advantages), dtype=torch.float32)
        sums = dict.fromkeys(["pg_loss", "kl_loss", "clip_frac", "ratio_mean", "num_steps", "nonfinite_loss"], 0.0)
        sums["num_images"] = float(len(samples))
        mins, maxs = {"ratio_min": float("inf")}, {"ratio_max": float("-inf")}
        for j, sl in enumerate(micro):
            ds_engine.mark_accumulation_boundary(self.engine, j == len(micro) - 1)
            chunk = items[sl]
            res = self._score(samples, chunk, False, negative_embeds, grad=True)
            old = torch.tensor([float(samples[i.sample].log_probs[i.step]) for i in chunk], device=self.device)
            adv = adv_all[[i.sample for i in chunk]].to(self.device)
            terms = algos.flow_grpo_loss_terms(res.log_prob, old, adv, self.clip_range, self.adv_clip)
            pg = terms.loss * (len(chunk) / normalizer)
            loss = pg
            if self.kl_coef > 0:
                kl = self._kl(samples, chunk, res, negative_embeds).sum() / normalizer
                loss = loss + self.kl_coef * kl
                sums["kl_loss"] += float(kl.detach())
            sums["nonfinite_loss"] += float(finite.count_nonfinite(loss.detach()))
            self.engine.backward(self.image_loss_weight * finite.poison_nonfinite(loss) * scale)  # non-finite: no update
            self._engine_step(is_last=j == len(micro) - 1)
            b = float(len(chunk))
            sums["pg_loss"] += float(pg.detach())
            sums["clip_frac"] += float(terms.clip_frac) * b
            sums["ratio_mean"] += float(terms.ratio_mean) * b
            sums["num_steps"] += b
            mins["ratio_min"] = min(mins["ratio_min"], float(terms.ratio_min))
            maxs["ratio_max"] = max(maxs["ratio_max"], float(terms.ratio_max))
        m = self._finish_step(sums, mins, maxs, start, unit="images")
        m["clip_frac"] /= max(m["num_steps"], 1.0)
        m["ratio_mean"] /= max(m["num_steps"], 1.0)
        m["loss"] = self.image_loss_weight * (m["pg_loss"] + self.kl_coef * m["kl_loss"])
        return m

    # ---- model ------------------------------------------------------------------------------
    def _transformer_folder(self) -> Path:
        path = Path(self.model_path)
        return path / "transformer" if (path / "transformer").is_dir() else path

    def _inner_dim(self) -> int:
        """The transformer's width: heads x head dim."""
        config = json.loads((self._transformer_folder() / "config.json").read_text())
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"])

    def _load_transformer(self, ds_config: dict[str, Any]) -> torch.nn.Module:
        """The transformer in the learner's dtype; under ZeRO-3 built partitioned and filled one
        checkpoint tensor at a time (`lean_init`), never whole on any rank."""
        from diffusers import FluxTransformer2DModel

        folder = self._transformer_folder()
        if not lean_init.is_zero3(ds_config):
            return FluxTransformer2DModel.from_pretrained(str(folder), torch_dtype=self.dtype)
        with lean_init.partitioned_construction(ds_config):
            model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(str(folder)))
        lean_init.load_safetensors_partitioned(model, folder)
        return model

    def _copy_side_files(self, out: Path) -> None:
        """The transformer folder is self-contained (config.json + safetensors)."""

    def _module(self, reference: bool):
        if self.lora is not None:  # the reference is the base: the same module with its adapters off
            return self.lora.forward_of(self.engine, self.engine.module, reference)
        if not reference:
            return self.engine
        if self.ref_model is None:
            raise ValueError("reference velocities need kl_coef > 0 (no reference model was loaded)")
        return self.ref_model

    class _Scored(NamedTuple):
        log_prob: torch.Tensor  # (B,)
        mean: torch.Tensor  # (B, L, C)
        std: torch.Tensor  # (B, 1, 1)
        velocity: torch.Tensor  # (B, L, C)

    def _score(self, samples: Sequence[ImageSample], chunk: list[_Item], reference: bool,
               negative_embeds: tuple[Any, Any] | None, grad: bool) -> DiffusionLearner._Scored:
        """Velocity and SDE-step log-prob of each item; sub-batches share size and edit-ness."""
        parts: dict[tuple, list[int]] = {}
        for k, it in enumerate(chunk):
            s = samples[it.sample]
            parts.setdefault((s.image.shape[0], s.image.shape[1], s.source_latents is not None), []).append(k)
        results: list[tuple[list[int], DiffusionLearner._Scored]] = []
        for (height, width, _), rows in parts.items():
            results.append((rows, self._score_uniform(samples, [chunk[k] for k in rows], height, width,
                                                      reference, negative_embeds, grad)))
        if len(results) == 1:
            return results[0][1]
        order = torch.tensor([k for rows, _ in results for k in rows], device=self.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=self.device)
        cat = [torch.cat([r[f] for _, r in results])[inverse] for f in range(4)]
        return DiffusionLearner._Scored(*cat)

    def _score_uniform(self, samples, chunk, height, width, reference, negative_embeds, grad):
        def stack(get) -> torch.Tensor:
            return torch.stack([torch.as_tensor(np.asarray(get(samples[i.sample], i.step)))
                                for i in chunk]).to(self.device, torch.float32)

        x = stack(lambda s, j: s.latents[j])  # (B, L, C)
        x_next = stack(lambda s, j: s.next_latents[j])
        sigma = stack(lambda s, j: s.sigmas[j])  # (B,)
        sigma_next = stack(lambda s, j: s.sigmas_next[j])
        level = stack(lambda s, j: s.noise_level)
        embeds = stack(lambda s, j: s.prompt_embeds)  # (B, T, D)
        pooled = stack(lambda s, j: s.pooled_embeds)  # (B, P)
        source = stack(lambda s, j: s.source_latents) if samples[chunk[0].sample].source_latents is not None else None
        guidance = stack(lambda s, j: s.guidance) if self.guidance_embeds else None
        model = self._module(reference)
        with torch.set_grad_enabled(grad and not reference):
            v = flux_velocity(model, x, sigma, embeds, pooled, guidance, height, width, source,
                              vae_scale_factor=self.vae_scale_factor)
            if self.cfg_scale != 1.0:
                v = self._guided(model, v, x, sigma, negative_embeds, guidance, height, width, source)
            step = self.sde_step(v, sigma, sigma_next, x, level, prev_sample=x_next)
        return DiffusionLearner._Scored(step.log_prob, step.mean, step.std, v)

    def _guided(self, model, v_cond, x, sigma, negative_embeds, guidance, height, width, source):
        """Train-time CFG: the unconditional branch is computed without gradient."""
        if negative_embeds is None:
            raise ValueError(f"cfg_scale={self.cfg_scale} needs negative_embeds (unconditional prompt)")
        neg, neg_pooled = (torch.as_tensor(np.asarray(t), dtype=torch.float32, device=self.device)
                           for t in negative_embeds)
        b = x.shape[0]
        with torch.no_grad():
            v_u = flux_velocity(model, x, sigma, neg.expand(b, -1, -1), neg_pooled.expand(b, -1),
                                guidance, height, width, source, vae_scale_factor=self.vae_scale_factor)
        return v_u + self.cfg_scale * (v_cond - v_u)

    def _kl(self, samples, chunk, res: DiffusionLearner._Scored, negative_embeds) -> torch.Tensor:
        """Per-item KL to the reference transformer, (B,)."""
        ref = self._score(samples, chunk, True, negative_embeds, grad=False)
        if self.kl_mode == "mean":
            return algos.flow_kl(res.mean, ref.mean, res.std.reshape(-1))
        return algos.velocity_kl(res.velocity, ref.velocity)


def _pipeline_vae_scale(model_path: Path) -> int:
    """2^(VAE levels − 1), as `FluxKontextPipeline.vae_scale_factor` computes it."""
    config = model_path / "vae" / "config.json"
    if not config.is_file():
        return FLUX_VAE_SCALE
    return 2 ** (len(json.loads(config.read_text())["block_out_channels"]) - 1)


def _items(samples: Sequence[ImageSample]) -> list[_Item]:
    items = []
    for i, s in enumerate(samples):
        if s.latents is None or s.log_probs is None or s.prompt_embeds is None:
            raise ValueError(f"sample {i} has no training data (sampled with keep_training_data=False?)")
        items += [_Item(i, j) for j in range(len(s.log_probs))]
    if not items:
        raise ValueError("no stored stochastic steps in the batch (stochastic='none'?)")
    return items
