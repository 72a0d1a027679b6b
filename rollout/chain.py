"""Chain mode (beyond the paper, docs/design.md#chain-mode): whole trajectories of up to K rounds per sample.

Round 0 plans and generates (G members per prompt share the initial noise unless
`StageSettings.share_group_noise` is off); each later round shows every still-active trajectory its
current image, asks for one reflection (n = 1) and edits
unless the answer is the stop decision, which ends that trajectory (the stop is learned: it is a
sampled answer with its own reward). The same loop, with ODE sampling and one sample per prompt,
is the multi-round evaluation (`rollout.evaluation`). Rewards and credit: `reward.shaping`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from rollout.buffer import BufferEntry
from rollout.datasets import PromptRecord
from rollout.interfaces import Generator, Judge, Reasoner
from rollout.stages import StageSettings, plan_and_generate, reflect_and_edit
from rollout.trajectory import Round, Trajectory

__all__ = ["run_chain", "current_state", "is_finished"]


def run_chain(
    records: Sequence[PromptRecord],
    reasoner: Reasoner,
    generator: Generator,
    judge: Judge,
    settings: StageSettings,
    rng: random.Random,
    max_rounds: int,
    *,
    stages: tuple[str, str] = ("generate", "refine"),
    group_offset: int = 0,
    on_round: Callable[[list[Trajectory]], None] | None = None,
) -> list[Trajectory]:
    """G trajectories per record (laid out group after group) of at most `max_rounds` rounds.

    Each round is one batched call per role over all active trajectories. `stages` names the
    stage of round 0 and of later rounds in the records (evaluation uses ("eval", "eval")).
    `on_round(trajectories)`, if given, is called after each round has been appended (so a
    caller can show rounds as they finish); an exception it raises ends the chain there.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1 (1 generation + refinements), got {max_rounds}")
    G = settings.group_size
    first = plan_and_generate(records, G, reasoner, generator, judge, settings, rng, stage=stages[0])
    trajs = [
        Trajectory(r.prompt, r.metadata, group_offset + g, [rnd])
        for g, (r, rounds) in enumerate(zip(records, first, strict=True))
        for rnd in rounds
    ]
    if on_round is not None:
        on_round(trajs)
    for _ in range(1, max_rounds):
        active = [t for t in trajs if not is_finished(t)]
        if not active:
            break
        states = [current_state(t) for t in active]
        rounds = reflect_and_edit(states, 1, reasoner, generator, judge, settings, rng, stage=stages[1])
        for t, (rnd,) in zip(active, rounds, strict=True):
            t.rounds.append(rnd)
        if on_round is not None:
            on_round(trajs)
    return trajs


def is_finished(trajectory: Trajectory) -> bool:
    """A trajectory ends with its stop decision."""
    return bool(trajectory.rounds) and trajectory.rounds[-1].stopped


def current_state(trajectory: Trajectory) -> BufferEntry:
    """The image a trajectory shows now (its last drawn image) with that image's score."""
    last_img = _last_image_round(trajectory.rounds)
    last = trajectory.rounds[-1]
    return BufferEntry(
        prompt=trajectory.prompt,
        image=last_img.image.image,
        score=last.score,
        correct=last.correct,
        metadata=trajectory.metadata,
        round_index=last.index,
    )


def _last_image_round(rounds: list[Round]) -> Round:
    for r in reversed(rounds):
        if r.image is not None:
            return r
    raise ValueError("trajectory has no image yet (round 0 must plan and generate)")
