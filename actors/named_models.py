"""Named models: what a config's `tiny:<name>` model path means.

A name maps to a function that returns the model's local folder (building it first when it is
cheap, as the tiny models are). The built-ins are the three tiny test models of
`actors.models.build_tiny_models`: "lm", "vlm" and "flux", and "qwen25vl" / "qwen2vl" (`actors.models.tiny_qwen25vl`,
`tiny_qwen2vl`, served with `models.reasoner.backend: hf`). A task's plugin module (config key
`plugins`) registers its own, e.g. a warm start that ships with it:

    @register_named_model("mytask-vlm")
    def _mytask_vlm() -> Path:
        return Path(__file__).parent / "warmstart" / "vlm"

Names are resolved in the driver process (`cluster.session.resolve_model_path`); actors receive
the folder, never the name. This module imports nothing heavy; a model is built only when its
name is resolved.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rollout.plugins import add_to_registry

__all__ = ["NamedModel", "register_named_model", "known_named_models", "named_model_path"]

NamedModel = Callable[[], Path]
_REGISTRY: dict[str, NamedModel] = {}


def register_named_model(name: str) -> Callable[[NamedModel], NamedModel]:
    """Register `fn() -> Path` (the model's folder) under `name`; a second registration of a name raises."""

    return add_to_registry(_REGISTRY, "named model", name)


def known_named_models() -> list[str]:
    return sorted(_REGISTRY)


def named_model_path(name: str) -> Path:
    """The folder of the model registered as `name` (its function may build it first).

    Raises:
        ValueError: `name` is not registered (the message lists the known names), or the model's
            own function refuses (e.g. a warm start that has not been built).
    """
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown named model {name!r} (a model path 'tiny:{name}'); known: {known_named_models()} "
            "(a plugin may register more: config key plugins)"
        )
    return Path(_REGISTRY[name]())


def _tiny(field: str) -> NamedModel:
    def path() -> Path:
        from actors.models import build_tiny_models

        return getattr(build_tiny_models(), field)

    path.__doc__ = f"The tiny test model {field!r} (`actors.models.build_tiny_models`), built on first use."
    return path


for _field in ("lm", "vlm", "flux"):
    register_named_model(_field)(_tiny(_field))


@register_named_model("qwen25vl")
def _tiny_qwen25vl() -> Path:
    """The tiny Qwen2.5-VL (`actors.models.tiny_qwen25vl`), built on first use."""
    from actors.models import tiny_qwen25vl

    return tiny_qwen25vl()


@register_named_model("qwen2vl")
def _tiny_qwen2vl() -> Path:
    """The tiny Qwen2-VL (`actors.models.tiny_qwen2vl`), built on first use."""
    from actors.models import tiny_qwen2vl

    return tiny_qwen2vl()
