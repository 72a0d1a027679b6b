"""The tiny FLUX.1-Kontext-style pipeline: seeded, loadable, and not degenerate."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline.from_pretrained(str(tiny_models.flux))


def test_build_is_seeded(tiny_models, tmp_path):
    from safetensors.torch import load_file

    from actors.tiny_flux import build_tiny_flux

    fresh = build_tiny_flux(tmp_path / "flux", seed=0)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        (a,) = (fresh / part).glob("*.safetensors")
        (b,) = (tiny_models.flux / part).glob("*.safetensors")
        ta, tb = load_file(str(a)), load_file(str(b))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), part


def test_tokenizers_append_eos_so_clip_pools_the_whole_prompt(pipe):
    ids = pipe.tokenizer("a red circle").input_ids
    assert ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.model_max_length == 512
    _, pooled, _ = pipe.encode_prompt(["a red circle", "a red square"], prompt_2=None, max_sequence_length=64)
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3  # differ only after the first tokens


def test_vae_latents_and_images_have_sane_ranges(pipe):
    vae, gen = pipe.vae, torch.Generator().manual_seed(0)
    red, blue = torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64)
    red[:, 0], blue[:, 2] = 1.0, 1.0
    images = torch.cat([red * 2 - 1, blue * 2 - 1, torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1])
    with torch.no_grad():
        z = (vae.encode(images).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        assert 0.5 < float(z.std()) < 2.0
        assert float((z[0] - z[1]).abs().mean()) > 0.1  # different images, different latents
        noise = torch.randn(4, 16, 8, 8, generator=gen)
        pixels = vae.decode(noise / vae.config.scaling_factor + vae.config.shift_factor).sample
    assert 0.2 < float(pixels.std()) < 1.0
    assert float((pixels.abs() >= 1).float().mean()) < 0.5  # mostly not clamped
    assert float((pixels[0] - pixels[1]).abs().mean()) > 0.1
