"""What one generator `train_step` does around the objective: FlowGRPO or DiffusionNFT, several
optimizer updates per rollout batch, the frozen rollout policy NFT compares against, and the EMA of
the weights that evaluation uses. A mixin of `learners.diffusion_learner.DiffusionLearner`.

Design: docs/design.md#diffusionnft-several-updates-per-batch-and-the-ema.

- `updates_per_batch` K: K optimizer updates over the same samples and advantages. FlowGRPO's ratio
  is 1 only in the first (the stored log-probs are the rollout's), then the clip acts. The version
  still advances by one per `train_step` (it counts rollout batches, in lockstep with the driver);
  the lr schedule advances once per update.
- DiffusionNFT (`learners.nft_math`) needs v_old, the velocity of the weights that drew the samples
  (`ImageSample.weight_version`). When those are the live weights before the first update, v_old is
  v_θ without gradient (no second forward). Otherwise a snapshot of the weights of that version is
  kept (`learners.ema.ParameterShadow`): the current version's when K > 1, and in one-step-off mode
  also the previous one's (its rollouts are one version stale); snapshots are checkpointed.
- EMA (`ema_decay` > 0): after every optimizer update ema ← d·ema + (1 − d)·θ of the trained
  parameters, with d warmed up as min(d, (1 + n) / (10 + n)) after n updates unless `ema_warmup` is
  off (`learners.ema.warmed_up_decay`); `ema_swap_in` / `ema_swap_out` let the driver sync it to the
  workers for evaluation, `save_ema_weights` writes it as model weights for a checkpoint.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from learners import algos, ds_engine, finite
from learners.ema import ParameterShadow, check_supported, warmed_up_decay
from learners.nft_math import NFT_WEIGHTINGS, nft_loss_terms, noised_latents
from rollout.flux_forward import flux_velocity
from rollout.trajectory import ImageSample

__all__ = ["ImageUpdates", "ALGORITHMS"]

ALGORITHMS = ("flow_grpo", "nft")


class ImageUpdates:
    """Mixin: needs `engine`, `device`, `rank`, `version`, `micro_batch_size`, `kl_coef`,
    `image_loss_weight`, `adv_clip`, `vae_scale_factor`, `guidance_embeds`, `_module`, and the
    `LearnerBase` step helpers; the class provides `_flow_grpo_update`."""

    def _setup_updates(self, *, algorithm: str, updates_per_batch: int, ema_decay: float, ema_warmup: bool,
                       nft_beta: float, nft_weighting: str, nft_timesteps: int, keep_previous_weights: bool,
                       seed: int, zero_stage: int) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown image algorithm {algorithm!r}; known: {list(ALGORITHMS)}")
        if updates_per_batch < 1:
            raise ValueError(f"updates_per_batch must be >= 1, got {updates_per_batch}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = no EMA), got {ema_decay}")
        if nft_beta <= 0 or nft_timesteps < 1 or nft_weighting not in NFT_WEIGHTINGS:
            raise ValueError(f"NFT needs beta > 0 (got {nft_beta}), timesteps >= 1 (got {nft_timesteps}) and a "
                             f"weighting in {list(NFT_WEIGHTINGS)} (got {nft_weighting!r})")
        self.algorithm, self.updates_per_batch, self.ema_decay = algorithm, updates_per_batch, ema_decay
        self.nft_beta, self.nft_weighting, self.nft_timesteps = nft_beta, nft_weighting, nft_timesteps
        self._update_seed = seed
        self._snapshot_versions = 0
        if algorithm == "nft":
            self._snapshot_versions = (2 if keep_previous_weights else 1) if (
                keep_previous_weights or updates_per_batch > 1) else 0
        if self._snapshot_versions:
            check_supported(zero_stage, "DiffusionNFT with several updates per batch or one-step-off rollouts")
        self._snapshots: dict[int, ParameterShadow] = {}
        self.ema: ParameterShadow | None = None
        self.ema_warmup, self._ema_updates = ema_warmup, 0
        if ema_decay > 0:
            check_supported(zero_stage, "the EMA of the generator (flow_grpo.ema_decay)")
            self.ema = ParameterShadow(self.engine.module)

    # ---- public -----------------------------------------------------------------------------
    def train_step(self, samples: Sequence[ImageSample], advantages: Sequence[float],
                   negative_embeds: tuple[Any, Any] | None = None) -> dict[str, float]:
        """`updates_per_batch` updates over this rank's samples with the configured objective (collective).

        advantages: one per sample. negative_embeds: (prompt_embeds (T, D), pooled (P,)) of the
        unconditional prompt, for FlowGRPO with cfg_scale != 1. Returns the metrics of the updates
        averaged (`u<k>/...` per update when there are several), reduced over all ranks; an update with
        non-finite advantages, losses or gradients changes nothing (`skipped_nonfinite`, `learners.finite`).
        """
        if len(samples) != len(advantages):
            raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
        base = self.version
        if self._snapshot_versions:
            self._remember_weights()
        per_update = []
        for u in range(self.updates_per_batch):
            if self.algorithm == "nft":
                m = self._nft_update(samples, advantages, u)
            else:
                m = self._flow_grpo_update(samples, advantages, negative_embeds)
            if self.ema is not None and not m.get("skipped_nonfinite"):
                decay = warmed_up_decay(self.ema_decay, self._ema_updates) if self.ema_warmup else self.ema_decay
                self.ema.ema_step(self.engine.module, decay)
                self._ema_updates += 1
                m["ema_decay"] = decay
            per_update.append(m)
        self.version = base + 1  # one rollout batch, however many updates
        return _combine(per_update, self.version)

    def ema_swap_in(self) -> bool:
        """Put the EMA weights into the model (a weight sync then sends them); False without an EMA."""
        if self.ema is None:
            return False
        self.ema.swap_in(self.engine.module)  # with LoRA the next sync merges the swapped-in adapters
        return True

    def ema_swap_out(self) -> bool:
        """Restore the live weights after `ema_swap_in`, bit for bit."""
        if self.ema is None:
            return False
        self.ema.swap_out(self.engine.module)
        return True

    def save_ema_weights(self, out_dir: str) -> str | None:
        """The EMA as model weights, in the layout `save` writes (rank 0 writes); None without an EMA."""
        if self.ema is None:
            return None
        with self.ema.swapped_in(self.engine.module):
            return self.save(out_dir)

    def ema_checksum(self) -> float:
        """Sum of float64 sums of the EMA tensors (nan without an EMA)."""
        if self.ema is None:
            return float("nan")
        return float(sum(t.double().sum() for t in self.ema.tensors.values()))

    def extra_state(self) -> dict[str, Any]:
        """What a checkpoint keeps beyond the engine: the EMA and the rollout-policy snapshots."""
        return {"ema": self.ema.state_dict() if self.ema is not None else None, "ema_updates": self._ema_updates,
                "snapshots": {str(v): s.state_dict() for v, s in self._snapshots.items()}}

    def load_extra_state(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError("the checkpoint holds no EMA of the generator, but flow_grpo.ema_decay > 0: "
                                 "resume with flow_grpo.ema_decay=0, or from a checkpoint of a run with an EMA")
            self.ema.load_state_dict(state["ema"])
            # A checkpoint written before the EMA counted its updates comes from a run without the warm-up:
            # counting it as long done continues that run's decay exactly.
            self._ema_updates = int(state.get("ema_updates", 10**9))
        self._snapshots = {}
        for version, tensors in (state.get("snapshots") or {}).items():
            shadow = ParameterShadow(self.engine.module)
            shadow.load_state_dict(tensors)
            self._snapshots[int(version)] = shadow

    # ---- NFT --------------------------------------------------------------------------------
    def _remember_weights(self) -> None:
        """Keep the current weights as the snapshot of `self.version`; drop the ones no batch can need."""
        keep = {v for v in self._snapshots if v > self.version - self._snapshot_versions}
        self._snapshots = {v: s for v, s in self._snapshots.items() if v in keep}
        shadow = self._snapshots.get(self.version)
        if shadow is None:
            shadow = ParameterShadow(self.engine.module)
            self._snapshots[self.version] = shadow
        shadow.copy_from(self.engine.module)

    def _nft_update(self, samples: Sequence[ImageSample], advantages: Sequence[float], update: int) -> dict[str, float]:
        """One DiffusionNFT optimizer update over `nft_timesteps` random (t, ε) per image (collective)."""
        start = time.perf_counter()
        nonfinite_adv = self._begin_update(advantages)
        if nonfinite_adv:
            return self._refused_update(nonfinite_adv, start)
        for i, s in enumerate(samples):
            if s.final_latents is None or s.prompt_embeds is None:
                raise ValueError(f"sample {i} has no final latents or prompt embeddings (sampled with "
                                 "keep_training_data=False?)")
        items = [(i, k) for i in range(len(samples)) for k in range(self.nft_timesteps)]
        gen = torch.Generator("cpu").manual_seed(_draw_seed(self._update_seed, self.version, update, self.rank))
        t_all = torch.rand(len(items), generator=gen)
        noise_all = [torch.randn(np.asarray(samples[i].final_latents).shape, generator=gen) for i, _ in items]
        micro = self._plan_micro_batches(len(items))
        normalizer = ds_engine.all_reduce_sum(len(items))
        ds_engine.set_micro_batches(self.engine, len(micro))
        scale = ds_engine.micro_loss_scale(self.engine, len(micro))
        self._lr_used = self.engine.get_lr()[0]
        adv_all = torch.tensor([float(a) for a in advantages], dtype=torch.float32)
        keys = ["pg_loss", "kl_loss", "nft_positive_loss", "nft_negative_loss", "nft_old_deviate",
                "nft_optimality", "num_steps", "nonfinite_loss"]
        sums = dict.fromkeys(keys, 0.0)
        sums["num_images"] = float(len(samples))
        maxs = {"nft_old_deviate_max": 0.0}
        for j, sl in enumerate(micro):
            ds_engine.mark_accumulation_boundary(self.engine, j == len(micro) - 1)
            rows = list(range(sl.start, sl.stop))
            chunk = [samples[items[r][0]] for r in rows]
            x0 = torch.stack([torch.tensor(np.asarray(s.final_latents), dtype=torch.float32)
                              for s in chunk]).to(self.device)
            noise = torch.stack([noise_all[r] for r in rows]).to(self.device)
            t = t_all[rows].to(self.device)
            x_t, _ = noised_latents(x0, noise, t)
            live_drew = {int(s.weight_version) for s in chunk} == {self.version} and update == 0
            # v_old first: swapping a snapshot in and out after the graph of v is built would break its backward
            v_old = None if live_drew else self._old_velocity(chunk, x_t, t)
            v = self._velocity(chunk, x_t, t, self._module(False), grad=True)
            if v_old is None:
                v_old = v.detach()  # the live weights before any update of this batch drew the samples
            adv = adv_all[[items[r][0] for r in rows]].to(self.device)
            terms = nft_loss_terms(v, v_old, x0, noise, t, adv, self.nft_beta, self.adv_clip, self.nft_weighting)
            pg = terms.loss.sum() / normalizer
            loss = pg
            if self.kl_coef > 0:
                v_ref = self._velocity(chunk, x_t, t, self._module(True), grad=False)
                kl = algos.velocity_kl(v, v_ref).sum() / normalizer
                loss = loss + self.kl_coef * kl
                sums["kl_loss"] += float(kl.detach())
            sums["nonfinite_loss"] += float(finite.count_nonfinite(loss.detach()))
            self.engine.backward(self.image_loss_weight * finite.poison_nonfinite(loss) * scale)
            self._engine_step(is_last=j == len(micro) - 1)
            sums["pg_loss"] += float(pg.detach())
            sums["nft_positive_loss"] += float(terms.positive_loss.sum())
            sums["nft_negative_loss"] += float(terms.negative_loss.sum())
            sums["nft_old_deviate"] += float(terms.old_deviate.sum())
            sums["nft_optimality"] += float(terms.optimality.sum())
            sums["num_steps"] += float(len(rows))
            maxs["nft_old_deviate_max"] = max(maxs["nft_old_deviate_max"], float(terms.old_deviate.max()))
        m = self._finish_step(sums, {}, maxs, start, unit="images")
        for k in ("nft_positive_loss", "nft_negative_loss", "nft_old_deviate", "nft_optimality"):
            m[k] /= max(m["num_steps"], 1.0)
        m["loss"] = self.image_loss_weight * (m["pg_loss"] + self.kl_coef * m["kl_loss"])
        return m

    def _old_velocity(self, chunk: list[ImageSample], x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v_old at x_t: the velocity of the snapshot of the weights that drew each sample, without gradient."""
        versions = sorted({int(s.weight_version) for s in chunk})
        out = torch.empty_like(x_t)
        for version in versions:
            shadow = self._snapshots.get(version)
            if shadow is None:
                raise ValueError(f"DiffusionNFT needs the weights of version {version}, which drew the samples, "
                                 f"but the learner (version {self.version}) holds {sorted(self._snapshots)}; "
                                 "rollouts may be at most one version stale (train.async_one_step_off)")
            rows = [k for k, s in enumerate(chunk) if int(s.weight_version) == version]
            with shadow.swapped_in(self.engine.module):
                out[rows] = self._velocity([chunk[k] for k in rows], x_t[rows], t[rows], self._module(False),
                                           grad=False)
        return out

    def _velocity(self, chunk: list[ImageSample], x_t: torch.Tensor, t: torch.Tensor, model: Any,
                  grad: bool) -> torch.Tensor:
        """The transformer's velocity at (x_t, t) with each sample's own conditioning; no CFG (NFT is
        CFG-free). Sub-batches share image size and edit-ness. (B, L, C)."""
        groups: dict[tuple, list[int]] = {}
        for k, s in enumerate(chunk):
            groups.setdefault((s.image.shape[0], s.image.shape[1], s.source_latents is not None), []).append(k)
        parts = []
        for (height, width, edit), rows in groups.items():
            def stack(get, rows=rows) -> torch.Tensor:
                return torch.stack([torch.tensor(np.asarray(get(chunk[k])), dtype=torch.float32)
                                    for k in rows]).to(self.device)

            embeds, pooled = stack(lambda s: s.prompt_embeds), stack(lambda s: s.pooled_embeds)
            source = stack(lambda s: s.source_latents) if edit else None
            guidance = stack(lambda s: s.guidance) if self.guidance_embeds else None
            with torch.set_grad_enabled(grad):
                parts.append((rows, flux_velocity(model, x_t[rows], t[rows], embeds, pooled, guidance, height, width,
                                                  source, vae_scale_factor=self.vae_scale_factor)))
        if len(parts) == 1:
            return parts[0][1]
        order = torch.tensor([k for rows, _ in parts for k in rows], device=self.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=self.device)
        return torch.cat([v for _, v in parts])[inverse]


def _draw_seed(seed: int, version: int, update: int, rank: int) -> int:
    """A seed for the (t, ε) draws of one update on one rank: the same after a resume."""
    digest = hashlib.sha256(f"nft:{seed}:{version}:{update}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _combine(per_update: list[dict[str, float]], version: int) -> dict[str, float]:
    """Metrics of K updates: means (sums for counts, max for skips), plus `u<k>/<name>` per update when K > 1."""
    if len(per_update) == 1:
        out = dict(per_update[0])
    else:
        keys = sorted(set().union(*per_update))
        out = {}
        for k in keys:
            values = [m[k] for m in per_update if k in m]
            if k in ("skipped_nonfinite",) or k.endswith("_max"):
                out[k] = max(values)
            elif k.endswith("_min"):
                out[k] = min(values)
            elif k in ("step_seconds", "nonfinite_loss", "nonfinite_advantages"):
                out[k] = sum(values)
            else:
                out[k] = sum(values) / len(values)
        for u, m in enumerate(per_update):
            for k in ("loss", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "nft_old_deviate",
                      "nft_positive_loss", "nft_negative_loss", "grad_norm"):
                if k in m:
                    out[f"u{u}/{k}"] = m[k]
    out["version"] = float(version)
    out["updates"] = float(len(per_update))
    return out
