"""The diffusion worker's request checks for the CPS step (pure: no pipeline is loaded)."""

import pytest

from actors.diffusion_worker import _validate
from rollout.interfaces import ImageRequest, SamplerSettings

REQUESTS = [ImageRequest(prompt="a red circle", seed=0, noise_seed=0)]


def test_cps_settings_are_checked_before_sampling():
    _validate(REQUESTS, SamplerSettings(num_steps=4, noise_level=1.0, stochastic="one", window_hi=3, sde="cps"))
    _validate(REQUESTS, SamplerSettings(num_steps=4, noise_level=1.5, stochastic="one", window_hi=4))  # flow_grpo
    with pytest.raises(ValueError, match="noise_level=1.5 must be <= 1"):
        _validate(REQUESTS, SamplerSettings(num_steps=4, noise_level=1.5, sde="cps"))
    with pytest.raises(ValueError, match="includes the last step"):
        _validate(REQUESTS, SamplerSettings(num_steps=4, noise_level=0.7, stochastic="one", window_hi=4, sde="cps"))
    with pytest.raises(ValueError, match="settings.sde='ddim'"):
        _validate(REQUESTS, SamplerSettings(sde="ddim"))  # type: ignore[arg-type]
