"""One R3 training step as pure composition (no Ray): rollout -> judge -> shaping -> advantages.

The driver passes Ray-backed `Reasoner` / `Generator` / `Judge` implementations; this module only
calls the `rollout` stages, `reward.shaping` and `learners.algos.group_advantages`, and returns the
trajectories (rewards and advantages filled in) plus flat learner batches and metrics.

- tree mode (paper, docs/design.md#tree-mode): `tree_stages` picks the stage(s) of a step:
  "alternate" runs the generate stage on even steps and the refine stage on odd ones (generate
  while the buffer is empty); "both" runs generate then refine every step. Generate results enter the buffer.
- chain mode: G trajectories of up to K rounds per prompt; advantages per (group, round) over the
  members that reached that round.

Advantages: A = R − group mean (optionally / std), text and image separately; stopped attempts get
image advantage 0 and never enter the image batch. With `drop_zero_variance`, groups whose rewards
are all equal are left out of the batch of that side. The image side may use its own std and
zero-variance policy (`image_adv_std`, `image_drop_zero_variance`; None: as the text side). With `null_advantages` (the null arm of a
learning claim, `learners.null_advantages`), each batch's advantages are shuffled among its items.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from cluster.step_metrics import batch_metrics, finite_mean, stage_metrics
from learners.algos import group_advantages, zero_variance_groups, zero_variance_keep_mask
from learners.null_advantages import null_seed, shuffle_advantages
from reward.instruction_match import best_match, instruction_match_metrics
from reward.shaping import chain_rewards, generate_rewards, refine_rewards
from rollout.buffer import BufferEntry, RolloutBuffer
from rollout.chain import run_chain
from rollout.datasets import PromptRecord
from rollout.interfaces import Generator, Judge, Reasoner
from rollout.judge_fixes import fixes_in
from rollout.stages import StageSettings, run_generate_stage, run_refine_stage
from rollout.trajectory import ImageSample, Round, TextSample, Trajectory

__all__ = [
    "R3StepSettings",
    "TextItem",
    "ImageItem",
    "StepResult",
    "tree_stages",
    "run_tree_step",
    "run_chain_step",
    "run_r3_step",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class R3StepSettings:
    """What one step does. `stage` holds the sampling settings and the group size G."""

    mode: Literal["tree", "chain"] = "tree"
    stage: StageSettings = field(default_factory=StageSettings)
    refine_groups: int = 2
    tree_schedule: Literal["alternate", "both"] = "alternate"
    max_rounds: int = 4
    discount: float | None = None
    format_weight: float = 1.0
    perfect_score: float = 1.0
    wrong_stop_penalty: float = 0.0  # refine Δ of a stop on an imperfect image is −this (paper: 0)
    instruction_weight: float = 0.0  # w_i of the instruction reward (reward.instruction_match; paper: 0)
    adv_std: Literal["none", "group", "global"] = "none"
    adv_eps: float = 1e-6
    drop_zero_variance: bool = False
    image_adv_std: Literal["none", "group", "global"] | None = None  # None: as adv_std (flow_grpo.adv_std)
    image_drop_zero_variance: bool | None = None  # None: as drop_zero_variance (flow_grpo.zero_variance_groups)
    buffer_refined: bool = False
    null_advantages: bool = False  # shuffle each batch's advantages among its items: same updates, no signal
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("tree", "chain"):
            raise ValueError(f"mode={self.mode!r}; allowed: 'tree', 'chain'")
        if self.tree_schedule not in ("alternate", "both"):
            raise ValueError(f"tree_schedule={self.tree_schedule!r}; allowed: 'alternate', 'both'")
        if self.adv_std not in ("none", "group", "global"):
            raise ValueError(f"adv_std={self.adv_std!r}; allowed: 'none', 'group', 'global'")
        if self.image_adv_std not in (None, "none", "group", "global"):
            raise ValueError(f"image_adv_std={self.image_adv_std!r}; allowed: None, 'none', 'group', 'global'")
        if self.refine_groups < 1 or self.max_rounds < 1:
            raise ValueError(
                f"refine_groups and max_rounds must be >= 1, got {self.refine_groups}, {self.max_rounds}"
            )

    @property
    def image_std(self) -> str:
        """The image side's advantage std normalisation."""
        return self.adv_std if self.image_adv_std is None else self.image_adv_std

    @property
    def image_zero_variance(self) -> str:
        """The image side's zero-variance policy, "keep" or "drop" (`algos.zero_variance_keep_mask`)."""
        drop = self.drop_zero_variance if self.image_drop_zero_variance is None else self.image_drop_zero_variance
        return "drop" if drop else "keep"


@dataclass
class TextItem:
    """One reasoner answer to train on; `images` are those shown in its prompt (reflect rounds)."""

    sample: TextSample
    advantage: float
    reward: float
    images: tuple[np.ndarray, ...] = ()
    stage: str = ""
    group: int = 0


@dataclass
class ImageItem:
    sample: ImageSample
    advantage: float
    reward: float
    stage: str = ""
    group: int = 0


@dataclass
class StepResult:
    step_index: int
    stages: list[str]
    trajectories: list[Trajectory]
    text_batch: list[TextItem]
    image_batch: list[ImageItem]
    metrics: dict[str, float]


def tree_stages(step_index: int, settings: R3StepSettings, buffer: RolloutBuffer) -> list[str]:
    """The stage(s) a tree-mode step runs (the driver draws prompts only when "generate" is in it)."""
    if settings.tree_schedule == "both":
        return ["generate", "refine"]
    if step_index % 2 == 0:
        return ["generate"]
    if not len(buffer):
        log.warning("step %d: refine stage due but the rollout buffer is empty; running generate", step_index)
        return ["generate"]
    return ["refine"]


def run_r3_step(
    step_index: int,
    prompts: Sequence[PromptRecord],
    reasoner: Reasoner,
    generator: Generator,
    judge: Judge,
    buffer: RolloutBuffer,
    settings: R3StepSettings,
) -> StepResult:
    """Dispatch on `settings.mode` (chain mode does not use the buffer)."""
    if settings.mode == "tree":
        return run_tree_step(step_index, prompts, reasoner, generator, judge, buffer, settings)
    return run_chain_step(step_index, prompts, reasoner, generator, judge, settings)


def run_tree_step(
    step_index: int,
    prompts: Sequence[PromptRecord],
    reasoner: Reasoner,
    generator: Generator,
    judge: Judge,
    buffer: RolloutBuffer,
    settings: R3StepSettings,
) -> StepResult:
    """One tree-mode step. `prompts` feed the generate stage (a refine-only step does not use them)."""
    rng = _step_rng(settings.seed, step_index)
    stages = tree_stages(step_index, settings, buffer)
    trajs: list[Trajectory] = []
    texts: list[TextItem] = []
    images: list[ImageItem] = []
    metrics: dict[str, float] = {}
    if "generate" in stages:
        if not prompts:
            raise ValueError(f"step {step_index} runs the generate stage but got no prompts")
        gen = run_generate_stage(prompts, reasoner, generator, judge, settings.stage, rng)
        rounds = [t.rounds[0] for t in gen]
        shaped = generate_rewards(
            [r.score for r in rounds], [r.well_formed for r in rounds], format_weight=settings.format_weight
        )
        m = _assign(gen, 0, shaped.text, shaped.image, [True] * len(gen), settings, "generate", texts, images)
        metrics.update(stage_metrics("generate", rounds, m))
        buffer.extend([_entry(t, t.rounds[0], step_index) for t in gen])
        trajs += gen
    if "refine" in stages:
        starts = buffer.sample(settings.refine_groups)
        ref = run_refine_stage(
            starts,
            reasoner,
            generator,
            judge,
            settings.stage,
            rng,
            group_offset=len(prompts) if "generate" in stages else 0,
        )
        rounds = [t.rounds[1] for t in ref]
        prev = [t.rounds[0].score for t in ref]
        shown = [fixes_in(t.rounds[0].judge_details) for t in ref]  # the judge's fixes of each input image
        matches = [best_match(r.instruction, f) for r, f in zip(rounds, shown, strict=True)]
        shaped = refine_rewards(
            prev,
            [r.score for r in rounds],
            [r.well_formed for r in rounds],
            [r.stopped for r in rounds],
            format_weight=settings.format_weight,
            perfect_score=settings.perfect_score,
            wrong_stop_penalty=settings.wrong_stop_penalty,
            instruction_match=[0.0 if x is None else x.score for x in matches],
            instruction_weight=settings.instruction_weight,
        )
        m = _assign(
            ref, 1, shaped.text, shaped.image, shaped.image_trainable, settings, "refine", texts, images
        )
        metrics.update(stage_metrics("refine", rounds, m))
        metrics["refine/delta_mean"] = finite_mean(shaped.delta)
        metrics.update(instruction_match_metrics(matches, "refine"))
        if settings.buffer_refined:
            buffer.extend([_entry(t, t.rounds[1], step_index) for t in ref if not t.rounds[1].stopped])
        trajs += ref
    _shuffle_if_null(texts, images, settings, step_index, metrics)
    metrics.update(batch_metrics([t.advantage for t in texts], [i.advantage for i in images], metrics, stages))
    metrics.update({"buffer/size": float(len(buffer)), "buffer/perfect": float(buffer.num_perfect)})
    return StepResult(step_index, stages, trajs, texts, images, metrics)


def run_chain_step(
    step_index: int,
    prompts: Sequence[PromptRecord],
    reasoner: Reasoner,
    generator: Generator,
    judge: Judge,
    settings: R3StepSettings,
) -> StepResult:
    """One chain-mode step: G trajectories of up to `max_rounds` rounds per prompt."""
    if not prompts:
        raise ValueError(f"chain step {step_index} got no prompts")
    rng = _step_rng(settings.seed, step_index)
    trajs = run_chain(prompts, reasoner, generator, judge, settings.stage, rng, settings.max_rounds)
    # cells[(group, round)] -> list of (trajectory, round, text credit, image reward, trainable)
    cells: dict[tuple[int, int], list] = {}
    for t in trajs:
        rs = t.rounds
        cr = chain_rewards(
            [r.score for r in rs],
            [r.well_formed for r in rs],
            [r.stopped for r in rs],
            format_weight=settings.format_weight,
            discount=settings.discount,
            perfect_score=settings.perfect_score,
            wrong_stop_penalty=settings.wrong_stop_penalty,
        )
        for k, r in enumerate(rs):
            r.text_reward, r.image_reward = cr.text[k], cr.image[k]  # the advantage uses the credit
            cells.setdefault((t.group_id, k), []).append(
                (t, r, cr.text_credit[k], cr.image[k], cr.image_trainable[k])
            )
    keys = sorted(cells, key=lambda x: (x[1], x[0]))
    text_adv = _cell_advantages([[c[2] for c in cells[k]] for k in keys], settings)
    image_adv = _cell_advantages([[c[3] for c in cells[k]] for k in keys], settings, settings.image_std)
    texts: list[TextItem] = []
    images: list[ImageItem] = []
    zero = {"text": 0, "image": 0}
    for key, ta, ia in zip(keys, text_adv, image_adv, strict=True):
        members = cells[key]
        flat_t = _flat([c[2] for c in members])  # a one-member cell counts: its advantage is 0
        flat_i = _flat([c[3] for c in members])
        zero["text"] += flat_t
        zero["image"] += flat_i
        for (t, r, tr, ir, trainable), a_t, a_i in zip(members, ta, ia, strict=True):
            r.text_advantage, r.image_advantage = a_t, (a_i if trainable else 0.0)
            shown = () if key[1] == 0 else (_image_before(t, key[1]),)
            if r.text is not None and not (settings.drop_zero_variance and flat_t):
                texts.append(TextItem(r.text, a_t, tr, shown, "chain", t.group_id))
            if trainable and r.image is not None and not (settings.image_zero_variance == "drop" and flat_i):
                images.append(ImageItem(r.image, a_i, ir, "chain", t.group_id))
    rounds = [r for t in trajs for r in t.rounds]
    metrics = stage_metrics(
        "chain",
        rounds,
        {"text_zero_var_groups": zero["text"], "image_zero_var_groups": zero["image"], "groups": len(keys)},
    )
    metrics["chain/rounds_mean"] = finite_mean([len(t.rounds) for t in trajs])
    _shuffle_if_null(texts, images, settings, step_index, metrics)
    metrics.update(batch_metrics([t.advantage for t in texts], [i.advantage for i in images], metrics, ["chain"]))
    return StepResult(step_index, ["chain"], trajs, texts, images, metrics)


# ------------------------------------------------------------------------------------ helpers


def _step_rng(seed: int, step_index: int) -> random.Random:
    """Each step's seeds depend only on (seed, step): resuming at step s redraws the same seeds."""
    return random.Random(seed * 1_000_003 + step_index)


def _assign(
    trajs: list[Trajectory],
    pos: int,
    text_r: list[float],
    image_r: list[float],
    trainable: list[bool],
    settings: R3StepSettings,
    stage: str,
    texts: list[TextItem],
    images: list[ImageItem],
) -> dict[str, int]:
    """Group advantages of round `pos` of one tree stage's trajectories (laid out group after
    group); fills the rounds' reward/advantage fields and the batches. A refine round (pos 1)
    was prompted with the input image of round 0."""
    G = settings.stage.group_size
    t_adv = group_advantages(
        torch.tensor(text_r, dtype=torch.float64), G, settings.adv_std, settings.adv_eps
    ).tolist()
    i_adv = group_advantages(
        torch.tensor(image_r, dtype=torch.float64), G, settings.image_std, settings.adv_eps
    ).tolist()
    keep_i = zero_variance_keep_mask(torch.tensor(image_r, dtype=torch.float64), G, settings.image_zero_variance)
    n_groups = len(trajs) // G
    flat_t = zero_variance_groups(torch.tensor(text_r, dtype=torch.float64), G).group_mask.tolist()
    flat_i = zero_variance_groups(torch.tensor(image_r, dtype=torch.float64), G).group_mask.tolist()
    for k, t in enumerate(trajs):
        g, r = k // G, t.rounds[pos]
        shown = (t.rounds[0].image.image,) if pos == 1 else ()
        r.text_reward, r.image_reward = float(text_r[k]), float(image_r[k])
        r.text_advantage = float(t_adv[k])
        r.image_advantage = float(i_adv[k]) if trainable[k] else 0.0
        if r.text is not None and not (settings.drop_zero_variance and flat_t[g]):
            texts.append(TextItem(r.text, r.text_advantage, r.text_reward, shown, stage, t.group_id))
        if trainable[k] and r.image is not None and bool(keep_i[k]):
            images.append(ImageItem(r.image, r.image_advantage, r.image_reward, stage, t.group_id))
    return {"text_zero_var_groups": sum(flat_t), "image_zero_var_groups": sum(flat_i), "groups": n_groups}


def _cell_advantages(cells: list[list[float]], settings: R3StepSettings,
                     std_mode: str | None = None) -> list[list[float]]:
    """Group advantages over cells of varying size; "global" divides by the std of all values.
    `std_mode`: the normalisation (None: `settings.adv_std`)."""
    std_mode = settings.adv_std if std_mode is None else std_mode
    std = "none" if std_mode == "global" else std_mode
    out = [
        group_advantages(torch.tensor(c, dtype=torch.float64), len(c), std, settings.adv_eps).tolist()
        for c in cells
    ]
    if std_mode == "global":
        scale = (
            torch.tensor([v for c in cells for v in c], dtype=torch.float64).std(unbiased=False).item()
            + settings.adv_eps
        )
        out = [[a / scale for a in c] for c in out]
    return out


def _shuffle_if_null(
    texts: list[TextItem], images: list[ImageItem], settings: R3StepSettings, step_index: int, metrics: dict
) -> None:
    """The null arm: each learner batch's advantages shuffled among its items (seeded by run seed,
    step and side). The trajectories keep the real advantages, so the run's records still show the
    signal it was denied. Logged as `null_advantages` (1 in a null run, 0 otherwise)."""
    metrics["null_advantages"] = float(settings.null_advantages)
    if not settings.null_advantages:
        return
    for side, items in (("text", texts), ("image", images)):
        real = torch.tensor([i.advantage for i in items], dtype=torch.float64)
        shuffled = shuffle_advantages(real, null_seed(settings.seed, step_index, side)).tolist()
        for item, a in zip(items, shuffled, strict=True):
            item.advantage = float(a)


def _image_before(t: Trajectory, k: int) -> np.ndarray:
    for r in reversed(t.rounds[:k]):
        if r.image is not None:
            return r.image.image
    raise ValueError(f"trajectory of {t.prompt!r} has no image before round {k}")


def _entry(t: Trajectory, r: Round, step: int) -> BufferEntry:
    fixes = [f.to_json() for f in fixes_in(r.judge_details)]  # what the reflect answer on this image should ask for
    return BufferEntry(t.prompt, r.image.image, r.score, r.correct, t.metadata, step, r.index, fixes=fixes)


def _flat(values: Sequence[float]) -> bool:
    """Whether one group (of any size) has all rewards equal, so all its advantages are 0."""
    return bool(zero_variance_groups(torch.tensor(values, dtype=torch.float64), len(values)).group_mask[0])
