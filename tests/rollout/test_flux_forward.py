"""flux_velocity plumbing (token concatenation, position ids, timestep, slicing) and latent packing.

A recording stand-in for the transformer checks the call itself; that the real transformer gives
the pipeline's velocity is tested end to end in tests/actors/test_diffusion_worker.py.
"""

import pytest
import torch

from rollout.flux_forward import flux_velocity, latent_image_ids, pack_latents, unpack_latents


class _Recorder(torch.nn.Module):
    """Returns hidden_states * 2 and remembers its keyword arguments."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.kwargs = {}

    def forward(self, **kwargs):
        self.kwargs = kwargs
        return (kwargs["hidden_states"] * self.scale,)


def test_pack_unpack_round_trip_and_layout():
    z = torch.arange(2 * 16 * 4 * 6, dtype=torch.float32).reshape(2, 16, 4, 6)
    tokens = pack_latents(z)
    assert tokens.shape == (2, 2 * 3, 64)
    # token (row 0, col 1) holds channel 0's 2x2 patch at rows 0-1, cols 2-3 first
    assert tokens[0, 1, :4].tolist() == [z[0, 0, 0, 2], z[0, 0, 0, 3], z[0, 0, 1, 2], z[0, 0, 1, 3]]
    assert torch.equal(unpack_latents(tokens, 32, 48), z)


def test_latent_image_ids_are_row_major_with_image_index():
    ids = latent_image_ids(2, 3, index=1)
    assert ids.tolist() == [[1, 0, 0], [1, 0, 1], [1, 0, 2], [1, 1, 0], [1, 1, 1], [1, 1, 2]]


def test_flux_velocity_generate_call():
    model = _Recorder()
    latents = torch.randn(3, 16, 64)
    v = flux_velocity(model, latents, 0.75, torch.randn(3, 5, 32), torch.randn(3, 32), 3.5, 64, 64)
    assert torch.equal(v, latents * 2)
    kw = model.kwargs
    assert kw["timestep"].tolist() == [0.75] * 3 and kw["guidance"].tolist() == [3.5] * 3
    assert kw["txt_ids"].shape == (5, 3) and not kw["txt_ids"].any()
    assert torch.equal(kw["img_ids"], latent_image_ids(4, 4))


def test_flux_velocity_edit_appends_source_tokens_and_slices_them_off():
    model = _Recorder()
    latents, source = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    sigma = torch.tensor([1.0, 0.5])
    v = flux_velocity(model, latents, sigma, torch.randn(2, 4, 32), torch.randn(2, 32), None, 64, 64, source)
    assert v.shape == (2, 16, 64) and torch.equal(v, latents * 2)
    kw = model.kwargs
    assert torch.equal(kw["hidden_states"], torch.cat([latents, source], dim=1))
    assert kw["img_ids"].shape == (32, 3)
    assert kw["img_ids"][:16, 0].eq(0).all() and kw["img_ids"][16:, 0].eq(1).all()
    assert torch.equal(kw["img_ids"][16:, 1:], kw["img_ids"][:16, 1:])
    assert kw["guidance"] is None and kw["timestep"].tolist() == [1.0, 0.5]


def test_flux_velocity_rejects_mismatched_sizes():
    model = _Recorder()
    with pytest.raises(ValueError, match="packs to 16"):
        flux_velocity(
            model, torch.randn(1, 20, 64), 0.5, torch.randn(1, 4, 32), torch.randn(1, 32), 1.0, 64, 64
        )
    with pytest.raises(ValueError, match="source_latents shape"):
        flux_velocity(
            model, torch.randn(1, 16, 64), 0.5, torch.randn(1, 4, 32), torch.randn(1, 32), 1.0, 64, 64,
            torch.randn(1, 4, 64),
        )  # fmt: skip
