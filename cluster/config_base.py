"""The base of every config section (`cluster.config`): unknown keys and non-finite floats are refused,
and assignments are validated."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["ConfigError", "TINY_PREFIX"]

TINY_PREFIX = "tiny:"  # model paths like "tiny:vlm" name a registered model (actors.named_models)


class ConfigError(ValueError):
    """A user mistake in the config or its overrides; the message says what and where."""


class _Section(BaseModel):
    # allow_inf_nan=False: no float field takes NaN or ±inf (e.g. `grpo.lr=.inf` would train NaN weights)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
