"""A tiny random FLUX.1-Kontext-style generator/editor, built offline (no hub, no downloads).

Same classes and call path as a real FLUX.1-Kontext checkpoint (`FluxKontextPipeline`), so the
worker code that loads it is the code that loads the real model on GPU. Sizes (the exact config is
in the code below): a Flux transformer with 1 double and 2 single blocks and guidance embedding,
a 16-channel VAE with 8x downsampling, tiny CLIP + T5 encoders sharing the project's byte-level
BPE tokenizer. Everything is seeded, so two builds with the same seed are identical.
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["build_tiny_flux", "flux_scheduler", "flux_tokenizer", "TINY_FLUX_T5_MAX_LENGTH", "CLIP_MAX_LENGTH"]

logger = logging.getLogger(__name__)

TINY_FLUX_T5_MAX_LENGTH = 512
CLIP_MAX_LENGTH = 77
# A random VAE maps images to nearly identical latents and latents to nearly flat images;
# `_calibrate_vae` rescales both output convs to these spreads.
_TARGET_LATENT_STD = 1.0
_TARGET_DECODE_STD = 0.5


def build_tiny_flux(out_dir: Path, seed: int = 0):
    """Build, seed and `save_pretrained` a tiny `FluxKontextPipeline` into `out_dir`.

    Args:
        out_dir: target folder (created if missing); the caller handles temp dirs and renames.
        seed: torch seed for every random weight.

    Returns:
        `out_dir` as a `Path`, loadable with `FluxKontextPipeline.from_pretrained`.
    """
    import torch
    from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_clip = flux_tokenizer(CLIP_MAX_LENGTH)
    tok_t5 = flux_tokenizer(TINY_FLUX_T5_MAX_LENGTH)
    vocab = len(tok_clip)

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 6, 6],
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16],
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )
    _calibrate_vae(vae)
    clip = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=32,
            max_position_embeddings=CLIP_MAX_LENGTH,
            vocab_size=vocab,
            bos_token_id=tok_clip.bos_token_id,
            eos_token_id=tok_clip.eos_token_id,
            pad_token_id=tok_clip.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            vocab_size=vocab,
            pad_token_id=tok_t5.pad_token_id,
            eos_token_id=tok_t5.eos_token_id,
            decoder_start_token_id=tok_t5.pad_token_id,
        )
    )
    pipe = FluxKontextPipeline(
        scheduler=flux_scheduler(),
        vae=vae.eval(),
        text_encoder=clip.eval(),
        tokenizer=tok_clip,
        text_encoder_2=t5.eval(),
        tokenizer_2=tok_t5,
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    logger.info("tiny FLUX.1-Kontext-style pipeline saved to %s", out_dir)
    return out_dir


def flux_scheduler():
    """FLUX.1's flow-matching Euler scheduler (resolution-dependent shift), as its checkpoints ship it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def flux_tokenizer(max_length: int, **bpe_kwargs):
    """The project's byte-level BPE (`bpe_kwargs` go to `build_byte_bpe`), appending eos like
    CLIP/T5 tokenizers do.

    CLIP pools its output at the first eos token; without an appended eos the pooled embedding
    would only see the first token of the prompt.
    """
    from tokenizers import processors

    from actors.tokenizer import build_byte_bpe

    tok = build_byte_bpe(model_max_length=max_length, **bpe_kwargs)
    eos = tok.eos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.eos_token_id)]
    )
    return tok


def _calibrate_vae(vae) -> None:
    """Rescale the random VAE so it behaves like a trained one at the scales the pipeline uses.

    Encoder: scaled latents `(z - shift) * scale` of varied images get std ~1 (random init gives
    ~0.1, so source images would barely differ and edits would ignore them). Decoder: latents
    drawn as the pipeline decodes them (N(0,1) / scale + shift) give pixels with std ~0.5.
    """
    import torch

    cfg = vae.config
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        images = _calibration_images(gen)
        z = vae.encode(images).latent_dist.mode()
        spread = float(((z - cfg.shift_factor) * cfg.scaling_factor).std())
        _scale_conv(vae.encoder.conv_out, _TARGET_LATENT_STD / spread, channels=cfg.latent_channels)
        noise = torch.randn(4, cfg.latent_channels, 8, 8, generator=gen)
        out = vae.decode(noise / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
        _scale_conv(vae.decoder.conv_out, _TARGET_DECODE_STD / float(out.std()))


def _calibration_images(gen):
    """(8, 3, 64, 64) images in [-1, 1]: solid colours, gradients and noise."""
    import torch

    colours = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]], dtype=torch.float32)
    solid = colours[:, :, None, None].expand(4, 3, 64, 64)
    ramp = torch.linspace(-1, 1, 64)
    grads = torch.stack([ramp[None, None, :].expand(3, 64, 64), ramp[None, :, None].expand(3, 64, 64)])
    noise = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
    return torch.cat([solid, grads, noise])


def _scale_conv(conv, factor: float, channels: int | None = None) -> None:
    """Multiply a conv's output (its first `channels` outputs, or all) by `factor`."""
    if not (factor > 0 and factor < float("inf")):
        raise ValueError(f"tiny VAE calibration failed: scale factor {factor}")
    sl = slice(None) if channels is None else slice(0, channels)
    conv.weight[sl].mul_(factor)
    conv.bias[sl].mul_(factor)
