"""The one place that turns packed FLUX latents into a velocity (sampler and learner share it).

FLUX packs a (B, C, h, w) VAE latent into (B, h/2·w/2, 4C) tokens (2×2 patches). Each token gets a
3-axis rotary position id (axis 0 = which image, 1 = row, 2 = column); text tokens get id 0.
FLUX.1-Kontext edits by appending the source image's packed latents after the noisy ones on the
sequence axis, with ids whose axis 0 is 1, and keeping only the noisy tokens' outputs
(diffusers `pipeline_flux_kontext.py`, `prepare_latents` and the denoising loop).

Pure torch: `transformer` is any module with FluxTransformer2DModel's forward signature.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["flux_velocity", "latent_image_ids", "pack_latents", "unpack_latents", "FLUX_VAE_SCALE"]

FLUX_VAE_SCALE = 8  # the VAE downsamples by 8; packing by another 2


def flux_velocity(
    transformer: torch.nn.Module,
    latents: Tensor,
    sigma: float | Tensor,
    prompt_embeds: Tensor,
    pooled_embeds: Tensor,
    guidance: float | Tensor | None,
    height: int,
    width: int,
    source_latents: Tensor | None = None,
    *,
    source_size: tuple[int, int] | None = None,
    vae_scale_factor: int = FLUX_VAE_SCALE,
) -> Tensor:
    """Predicted velocity v = ε − x0 for the noisy target tokens.

    Args:
        transformer: a FluxTransformer2DModel (or anything with its forward signature).
        latents: (B, L, 4C) packed noisy latents, L = (height/16)·(width/16).
        sigma: current noise level, a float or a tensor of shape [B] (or 0-dim); the transformer
            receives timestep = (σ·1000)/1000 exactly as the diffusers pipeline computes it.
        prompt_embeds: (B, T, D) T5 token embeddings.
        pooled_embeds: (B, P) pooled CLIP embedding.
        guidance: the embedded guidance scale (float or [B]) for guidance-distilled models, or
            None for transformers without guidance embedding.
        height, width: target image size in pixels.
        source_latents: (B, Ls, 4C) packed latents of the source image when editing, else None.
        source_size: source image size in pixels (default: `(height, width)`).
        vae_scale_factor: pixel-to-latent downsampling (8 for FLUX).

    Returns:
        (B, L, 4C) fp32 velocity for the target tokens.
    """
    batch, seq_len, _ = latents.shape
    device, dtype = latents.device, _module_dtype(transformer, latents.dtype)
    grid_h, grid_w = _packed_grid(height, width, vae_scale_factor)
    if grid_h * grid_w != seq_len:
        raise ValueError(
            f"latents have {seq_len} tokens but a {height}x{width} image packs to {grid_h * grid_w}"
        )
    hidden = latents.to(dtype)
    img_ids = latent_image_ids(grid_h, grid_w, device=device)
    if source_latents is not None:
        src_h, src_w = _packed_grid(*(source_size or (height, width)), vae_scale_factor)
        if source_latents.shape[0] != batch or source_latents.shape[1] != src_h * src_w:
            raise ValueError(
                f"source_latents shape {tuple(source_latents.shape)} does not match batch {batch} "
                f"and a {src_h * src_w}-token source image"
            )
        hidden = torch.cat([hidden, source_latents.to(dtype)], dim=1)  # (B, L + Ls, 4C)
        img_ids = torch.cat([img_ids, latent_image_ids(src_h, src_w, index=1, device=device)], dim=0)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device)  # (T, 3)

    sigma_t = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    timestep = (sigma_t * 1000).expand(batch).to(dtype) / 1000  # (B,) like the pipeline's t/1000
    if guidance is not None:
        guidance = torch.as_tensor(guidance, dtype=torch.float32, device=device).expand(batch)
    out = transformer(
        hidden_states=hidden,
        timestep=timestep,
        guidance=guidance,
        pooled_projections=pooled_embeds.to(dtype),
        encoder_hidden_states=prompt_embeds.to(dtype),
        txt_ids=text_ids.to(dtype),
        img_ids=img_ids.to(dtype),
        return_dict=False,
    )[0]
    return out[:, :seq_len].float()  # (B, L, 4C): drop the source tokens


def latent_image_ids(grid_h: int, grid_w: int, index: int = 0, device=None) -> Tensor:
    """(grid_h·grid_w, 3) fp32 position ids: [index, row, column] per packed token, row-major."""
    ids = torch.zeros(grid_h, grid_w, 3, device=device)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(grid_h, device=device)[:, None]
    ids[..., 2] = torch.arange(grid_w, device=device)[None, :]
    return ids.reshape(grid_h * grid_w, 3)


def pack_latents(latents: Tensor) -> Tensor:
    """(B, C, h, w) VAE latents -> (B, h/2·w/2, 4C) tokens of 2×2 patches."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int, vae_scale_factor: int = FLUX_VAE_SCALE) -> Tensor:
    """(B, L, 4C) tokens -> (B, C, h, w) VAE latents for a `height`×`width` image."""
    b, _, c4 = tokens.shape
    grid_h, grid_w = _packed_grid(height, width, vae_scale_factor)
    x = tokens.view(b, grid_h, grid_w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, gh, 2, gw, 2)
    return x.reshape(b, c4 // 4, grid_h * 2, grid_w * 2)


# ------------------------------------------------------------------------------------ helpers


def _packed_grid(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """Token grid of a packed latent: pixels / (vae scale · 2), as diffusers rounds it."""
    return int(height) // (vae_scale_factor * 2), int(width) // (vae_scale_factor * 2)


def _module_dtype(module: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    for param in module.parameters():
        return param.dtype
    return default
