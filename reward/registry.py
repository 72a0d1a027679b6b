"""Judge factory: a config string ("vlm", "remote", "ocr", "constant", ...) -> a judge.

A spec is a plain dict `{"kind": NAME, **constructor_kwargs}` so it can be shipped to a Ray Serve
replica and built there (the engine then lives in the replica). An optional `"call_log": PATH`
wraps the judge in `CallLogJudge`; an optional `"plugins": [MODULE, ...]` is loaded first
(`rollout.plugins.load_plugins`), so that a kind a plugin registers resolves in a fresh replica
process too. Heavy imports (vLLM, onnxruntime) happen inside the factory branch that needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rollout.interfaces import Judge
from rollout.plugins import add_to_registry, load_plugins

__all__ = ["JudgeFactory", "register_judge", "build_judge", "known_judges"]

JudgeFactory = Callable[..., Judge]
_REGISTRY: dict[str, JudgeFactory] = {}


def register_judge(name: str) -> Callable[[JudgeFactory], JudgeFactory]:
    """Register a factory under `name`; a second registration of the same name raises."""

    return add_to_registry(_REGISTRY, "judge", name)


def known_judges() -> list[str]:
    """The registered kinds: the built-ins and those of the plugins loaded in this process."""
    return sorted(_REGISTRY)


def build_judge(spec: Mapping[str, Any]) -> Judge:
    """Build the judge described by `spec` (`{"kind": ..., **kwargs, "call_log"?: path, "plugins"?: [module]}`).

    Raises:
        ValueError: no `kind`, or an unknown one (the message lists the known kinds), or a plugin
            that cannot be imported.
    """
    kwargs = dict(spec)
    load_plugins(kwargs.pop("plugins", None) or [])
    kind = kwargs.pop("kind", None)
    call_log = kwargs.pop("call_log", None)
    if kind not in _REGISTRY:
        raise ValueError(
            f"unknown judge kind {kind!r} (config key judge.kind); known: {sorted(_REGISTRY)} "
            "(a plugin may register more: config key plugins)"
        )
    judge = _REGISTRY[kind](**kwargs)
    if call_log is not None:
        from reward.simple_judges import CallLogJudge

        judge = CallLogJudge(judge, path=call_log)
    return judge


@register_judge("vlm")
def _vlm(**kwargs: Any) -> Judge:
    from reward.vlm_judge import VLMJudge

    return VLMJudge(**kwargs)


@register_judge("remote")
def _remote(**kwargs: Any) -> Judge:
    from reward.remote_judge import RemoteJudge

    return RemoteJudge(**kwargs)


@register_judge("ocr")
def _ocr(**kwargs: Any) -> Judge:
    from reward.ocr_judge import OCRJudge

    return OCRJudge(**kwargs)


@register_judge("constant")
def _constant(**kwargs: Any) -> Judge:
    from reward.simple_judges import ConstantJudge

    return ConstantJudge(**kwargs)
