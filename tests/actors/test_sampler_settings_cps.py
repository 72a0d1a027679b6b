"""The diffusion worker's request checks for the CPS step (pure: no pipeline is loaded)."""

import pytest

from actors.diffusion_checks import check_image_requests
from rollout.interfaces import ImageRequest, SamplerSettings

REQUESTS = [ImageRequest(prompt="a red circle", seed=0, noise_seed=0)]


def test_cps_settings_are_checked_before_sampling():
    check_image_requests(REQUESTS, SamplerSettings(num_steps=4, noise_level=1.0, stochastic="one", window_hi=3, sde="cps"))
    check_image_requests(REQUESTS, SamplerSettings(num_steps=4, noise_level=1.5, stochastic="one", window_hi=4))  # flow_grpo
    with pytest.raises(ValueError, match="noise_level=1.5 must be <= 1"):
        check_image_requests(REQUESTS, SamplerSettings(num_steps=4, noise_level=1.5, sde="cps"))
    with pytest.raises(ValueError, match="includes the last step"):
        check_image_requests(REQUESTS, SamplerSettings(num_steps=4, noise_level=0.7, stochastic="one", window_hi=4, sde="cps"))
    with pytest.raises(ValueError, match="settings.sde='ddim'"):
        check_image_requests(REQUESTS, SamplerSettings(sde="ddim"))  # type: ignore[arg-type]
