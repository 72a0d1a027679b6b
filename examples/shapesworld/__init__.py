"""ShapesWorld, the worked example of adding a task to R3RL, and the plugin that adds it.

ShapesWorld is a verifiable GenEval-style world of simple shapes: a finite, seeded set of prompts
with a fixed train / test partition (`tasks`), an exact renderer (`render`), an exact judge
(`judge`) and the instruction that fixes a wrong image (`fixes`); a supervised warm start of a
small generator and reasoner (`models`, `recipe`, `pretrain`, `reasoner`, `vision`) that ships in
`warmstart/`; the RL run with its results (`run`, `results`) and a paired generator probe
(`probe`). Its config is `configs/shapes_cpu.yaml`.

A config loads this module with `plugins: [examples.shapesworld]`. Importing it registers, through
the same registries a user's own task would use:

- judge kind `shapes` (`reward.registry.register_judge`): the exact judge, which names the fix of
  a wrong image (`details["fixes"]`) for the reflect stage's instruction reward;
- judge kinds `shapes-colour-share` and `shapes-colour-area` (`colour_judge`): dense rewards, the
  share of the foreground or of the image drawn in the asked colour, for checks and benchmarks of
  image-side learning;
- prompt sources `shapes-train` and `shapes-test` (`rollout.datasets.register_prompt_source`): the
  two sides of the fixed partition;
- named models `shapes-flux` and `shapes-vlm` (`actors.named_models.register_named_model`): the
  generator and reasoner of the shipped warm start, as `tiny:shapes-flux` / `tiny:shapes-vlm`.

Kept light: the registered functions import the modules they need when they are called, so loading
the plugin imports neither torch nor diffusers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actors.named_models import register_named_model
from reward.registry import register_judge
from rollout.datasets import PromptRecord, register_prompt_source
from rollout.interfaces import Judge


@register_judge("shapes")
def _shapes_judge(**kwargs: Any) -> Judge:
    """The exact ShapesWorld judge (`examples.shapesworld.judge.ShapesJudge`), naming the fix of each
    wrong image (`examples.shapesworld.fixes.fixing_edit`); kwargs go to it."""
    from examples.shapesworld.fixes import fixing_edit
    from examples.shapesworld.judge import build_shapes_judge

    return build_shapes_judge(fix_of=fixing_edit, **kwargs)


@register_judge("shapes-colour-share")
def _colour_share_judge(**kwargs: Any) -> Judge:
    """Share of the foreground drawn in the asked colour(s) (`colour_judge.ColourShareJudge`)."""
    from examples.shapesworld.colour_judge import ColourShareJudge

    return ColourShareJudge(over="foreground", **kwargs)


@register_judge("shapes-colour-area")
def _colour_area_judge(**kwargs: Any) -> Judge:
    """Share of the whole image drawn in the asked colour(s) (`colour_judge.ColourShareJudge`)."""
    from examples.shapesworld.colour_judge import ColourShareJudge

    return ColourShareJudge(over="image", **{"correct_at": 0.5, **kwargs})


# The fixed partition (seed 0), whatever train.seed is: the warm start trained on its train side,
# so another partition would evaluate on prompts it was trained on.
@register_prompt_source("shapes-train")
def _shapes_train() -> list[PromptRecord]:
    from examples.shapesworld.tasks import shapes_split

    return shapes_split("train", seed=0)


@register_prompt_source("shapes-test")
def _shapes_test() -> list[PromptRecord]:
    from examples.shapesworld.tasks import shapes_split

    return shapes_split("test", seed=0)


@register_named_model("shapes-flux")
def _shapes_flux() -> Path:
    """The shipped warm start's generator; a clear error when it has not been built."""
    from examples.shapesworld.models import warm_start_path

    return warm_start_path("flux")


@register_named_model("shapes-vlm")
def _shapes_vlm() -> Path:
    """The shipped warm start's reasoner; a clear error when it has not been built."""
    from examples.shapesworld.models import warm_start_path

    return warm_start_path("vlm")
