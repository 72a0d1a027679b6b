"""Plugins: Python modules that a config names (`plugins: [my_task]`) to add a task to R3RL.

A plugin is an ordinary importable module whose import registers names in the product's
registries, exactly as the built-ins do: judge kinds (`reward.registry.register_judge`), prompt
sources (`rollout.datasets.register_prompt_source`) and named models
(`actors.named_models.register_named_model`). Nothing else is special about it; keep its import
light (heavy imports inside the registered factories), since every process that resolves one of
its names imports it.

Every process that resolves a registered name must load the plugins first: the driver does in
`cluster.config.load_config`; a judge built remotely in a Serve replica gets the list in its spec
(`reward.registry.build_judge` pops `"plugins"`). The module must be importable there too (an
installed package, or a folder on `PYTHONPATH`; `cluster.session` puts the project root there).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, MutableMapping, Sequence
from typing import TypeVar

__all__ = ["load_plugins", "add_to_registry"]

T = TypeVar("T")


def add_to_registry(registry: MutableMapping[str, T], kind: str, name: str) -> Callable[[T], T]:
    """The decorator behind every `register_*(name)` of the product's name registries: it stores
    the decorated object under `name` in `registry` and returns it unchanged.

    Raises:
        ValueError: `name` is already registered (the message names the `kind` and lists the known names).
    """

    def deco(obj: T) -> T:
        if name in registry:
            raise ValueError(f"{kind} {name!r} is already registered; known: {sorted(registry)}")
        registry[name] = obj
        return obj

    return deco


def load_plugins(modules: Sequence[str]) -> None:
    """Import each module named in `modules`, in order. Idempotent: a module is imported once
    per process (Python's module cache), so its registrations happen once.

    Raises:
        ValueError: a module cannot be imported, or its import fails (the message names the module
            and the config key `plugins`; the original error is chained).
    """
    if isinstance(modules, str):
        raise ValueError(f"plugins={modules!r}: expected a list of module names, e.g. [{modules}]")
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # any failure while importing the plugin, including its registrations
            raise ValueError(
                f"plugin {name!r} (config key plugins) could not be imported: {type(e).__name__}: {e}"
            ) from e
