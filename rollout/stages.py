"""The two stages of tree-mode R3 (docs/design.md#tree-mode), written against the `Reasoner`, `Generator` and
`Judge` protocols only (no transport, no rewards: shaping lives in `reward.shaping`).

- generate stage: P prompts × group G. One `TextRequest` per prompt with n = G (plan); the plan's
  answer is the generator prompt (malformed: the user prompt, f = 0); all G images of a group share
  `noise_seed` (unless `StageSettings.share_group_noise` is off); every image is judged against the
  *user* prompt.
- refine stage: each group starts from one buffered image; one `TextRequest` with that image and
  n = G (reflect); non-stopped attempts edit the image (`ImageRequest.source_image`); a stopped
  attempt keeps the input image and its score (its `Round.image` is None: nothing to train). The
  input round carries the judge's fixes of that image, if it named any (`rollout.judge_fixes`).

Each stage makes one batched call per role, so the driver can spread it over workers. All seeds
come from the caller's `random.Random`: same RNG state and same workers -> same records.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from rollout.buffer import BufferEntry
from rollout.datasets import PromptRecord
from rollout.interfaces import (
    Generator,
    ImageRequest,
    Judge,
    JudgeItem,
    JudgeResult,
    Reasoner,
    SamplerSettings,
    TextRequest,
    finite_judge_result,
)
from rollout.judge_fixes import FIXES_KEY
from rollout.templates import Templates, parse_plan, parse_reflect
from rollout.trajectory import ImageSample, Round, Trajectory

__all__ = [
    "StageSettings",
    "plan_and_generate",
    "reflect_and_edit",
    "run_generate_stage",
    "run_refine_stage",
    "INPUT_STAGE",
]

INPUT_STAGE = "input"  # stage name of the context round (the buffered image) of a refine trajectory
_SEED_RANGE = 2**31 - 1


@dataclass(frozen=True)
class StageSettings:
    """Sampling settings of both stages. `temperature`/`top_p`/`max_tokens` are the reasoner's.

    share_group_noise: the G images of a generate group start from one initial noise (True) or
    each from its own (False); edits of one refine group always share theirs.
    """

    group_size: int = 4
    share_group_noise: bool = True
    temperature: float = 0.9
    top_p: float = 0.9
    max_tokens: int = 64
    generate_sampler: SamplerSettings = field(default_factory=SamplerSettings)
    edit_sampler: SamplerSettings = field(default_factory=lambda: SamplerSettings(noise_level=1.0))
    templates: Templates = field(default_factory=Templates)

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_tokens < 1:
            raise ValueError(
                f"need temperature >= 0, 0 < top_p <= 1, max_tokens >= 1; got "
                f"{self.temperature}, {self.top_p}, {self.max_tokens}"
            )


def plan_and_generate(
    records: Sequence[PromptRecord],
    n: int,
    reasoner: Reasoner,
    generator: Generator,
    judge: Judge,
    settings: StageSettings,
    rng: random.Random,
    stage: str = "generate",
) -> list[list[Round]]:
    """Round 0 for `n` samples of each record: plan -> image -> judge. Returns [record][member]."""
    if not records:
        raise ValueError("plan_and_generate needs at least one prompt record")
    t = settings.templates
    requests = [_text_request(t.plan_messages(r.prompt), n, settings, rng) for r in records]
    texts = _generate_checked(reasoner, requests)
    plans = [
        [parse_plan(s.text, r.prompt, t) for s in group] for r, group in zip(records, texts, strict=True)
    ]
    image_requests = []
    for group in plans:
        if settings.share_group_noise:
            noise_seed = rng.randrange(_SEED_RANGE)  # one initial noise per group
            image_requests += [
                ImageRequest(p.generator_prompt, rng.randrange(_SEED_RANGE), noise_seed) for p in group
            ]
        else:  # seed, then noise seed, per member
            image_requests += [
                ImageRequest(p.generator_prompt, rng.randrange(_SEED_RANGE), rng.randrange(_SEED_RANGE))
                for p in group
            ]
    images = _sample_checked(generator, image_requests, settings.generate_sampler)
    items = []
    for g, r in enumerate(records):
        items += [JudgeItem(images[g * n + m].image, r.prompt, r.metadata) for m in range(n)]
    results = _score_checked(judge, items)
    out = []
    for g in range(len(records)):
        rounds = []
        for m in range(n):
            k = g * n + m
            rounds.append(
                _round(
                    0,
                    stage,
                    texts[g][m],
                    images[k],
                    results[k],
                    plans[g][m].well_formed,
                    plans[g][m].generator_prompt,
                )
            )
        out.append(rounds)
    return out


def reflect_and_edit(
    states: Sequence[BufferEntry],
    n: int,
    reasoner: Reasoner,
    generator: Generator,
    judge: Judge,
    settings: StageSettings,
    rng: random.Random,
    stage: str = "refine",
) -> list[list[Round]]:
    """One reflect+edit round for `n` attempts from each state. Returns [state][attempt].

    A stopped attempt keeps the state's image and score (`Round.image` None, `stopped` True).
    """
    if not states:
        raise ValueError("reflect_and_edit needs at least one starting state")
    t = settings.templates
    requests = [_text_request(t.reflect_messages(s.prompt, s.image), n, settings, rng) for s in states]
    texts = _generate_checked(reasoner, requests)
    answers = [
        [parse_reflect(x.text, s.prompt, t) for x in group] for s, group in zip(states, texts, strict=True)
    ]
    edits: list[tuple[int, int]] = []  # (state, attempt) of each edit request
    image_requests = []
    for g, (s, group) in enumerate(zip(states, answers, strict=True)):
        noise_seed = rng.randrange(_SEED_RANGE)
        for m, a in enumerate(group):
            seed = rng.randrange(_SEED_RANGE)  # drawn for stops too: seeds do not depend on decisions
            if not a.stop:
                edits.append((g, m))
                image_requests.append(ImageRequest(a.instruction, seed, noise_seed, source_image=s.image))
    images: list[ImageSample] = []
    results: list[JudgeResult] = []
    if image_requests:
        images = _sample_checked(generator, image_requests, settings.edit_sampler)
        items = [
            JudgeItem(img.image, states[g].prompt, states[g].metadata)
            for (g, _), img in zip(edits, images, strict=True)
        ]
        results = _score_checked(judge, items)
    by_attempt = {key: (img, res) for key, img, res in zip(edits, images, results, strict=True)}
    out = []
    for g, s in enumerate(states):
        rounds = []
        for m, a in enumerate(answers[g]):
            if a.stop:
                r = Round(
                    s.round_index + 1,
                    stage,
                    text=texts[g][m],
                    image=None,
                    score=s.score,
                    correct=s.correct,
                    stopped=True,
                    well_formed=a.well_formed,
                    instruction="",
                )
            else:
                img, res = by_attempt[(g, m)]
                r = _round(s.round_index + 1, stage, texts[g][m], img, res, a.well_formed, a.instruction)
            rounds.append(r)
        out.append(rounds)
    return out


def run_generate_stage(
    records: Sequence[PromptRecord],
    reasoner: Reasoner,
    generator: Generator,
    judge: Judge,
    settings: StageSettings,
    rng: random.Random,
    group_offset: int = 0,
) -> list[Trajectory]:
    """P prompts × G: one single-round trajectory per member, laid out group after group."""
    G = settings.group_size
    groups = plan_and_generate(records, G, reasoner, generator, judge, settings, rng)
    return [
        Trajectory(r.prompt, r.metadata, group_offset + g, [rnd])
        for g, (r, rounds) in enumerate(zip(records, groups, strict=True))
        for rnd in rounds
    ]


def run_refine_stage(
    starts: Sequence[BufferEntry],
    reasoner: Reasoner,
    generator: Generator,
    judge: Judge,
    settings: StageSettings,
    rng: random.Random,
    group_offset: int = 0,
) -> list[Trajectory]:
    """One group of G attempts per start; each trajectory is [input round, refine round]."""
    G = settings.group_size
    groups = reflect_and_edit(starts, G, reasoner, generator, judge, settings, rng)
    out = []
    for g, (s, rounds) in enumerate(zip(starts, groups, strict=True)):
        context = Round(
            s.round_index,
            INPUT_STAGE,
            image=ImageSample(image=s.image, prompt=s.prompt, seed=-1, noise_level=0.0),
            score=s.score,
            correct=s.correct,
            judge_details={"buffer_step": s.step, **({FIXES_KEY: list(s.fixes)} if s.fixes else {})},
        )
        out += [Trajectory(s.prompt, s.metadata, group_offset + g, [context, rnd]) for rnd in rounds]
    return out


# ------------------------------------------------------------------------------------ helpers


def _round(index, stage, text, image, result: JudgeResult, well_formed: bool, instruction: str) -> Round:
    details = dict(result.details)
    if result.error is not None:
        details["error"] = result.error
    if not 0.0 <= result.score <= 1.0:
        raise ValueError(f"judge returned score {result.score} outside [0, 1]")
    return Round(
        index,
        stage,
        text=text,
        image=image,
        score=float(result.score),
        correct=bool(result.correct),
        stopped=False,
        well_formed=well_formed,
        instruction=instruction,
        judge_details=details,
    )


def _text_request(messages, n: int, settings: StageSettings, rng: random.Random) -> TextRequest:
    """One reasoner request with the stage's sampling settings and a seed drawn from `rng`."""
    return TextRequest(messages=messages, n=n, temperature=settings.temperature, top_p=settings.top_p,
                       max_tokens=settings.max_tokens, seed=rng.randrange(_SEED_RANGE))


def _generate_checked(reasoner: Reasoner, requests: list[TextRequest]):
    out = reasoner.generate(requests)
    if len(out) != len(requests) or any(len(o) != r.n for o, r in zip(out, requests, strict=True)):
        raise ValueError(
            f"reasoner returned {[len(o) for o in out]} samples for requests with n={[r.n for r in requests]}"
        )
    return out


def _sample_checked(generator: Generator, requests: list[ImageRequest], settings: SamplerSettings):
    out = generator.sample(requests, settings)
    if len(out) != len(requests):
        raise ValueError(f"generator returned {len(out)} images for {len(requests)} requests")
    return out


def _score_checked(judge: Judge, items: list[JudgeItem]) -> list[JudgeResult]:
    """One result per item; a non-finite score becomes an error result (counted, never a reward)."""
    out = judge.score(items)
    if len(out) != len(items):
        raise ValueError(f"judge returned {len(out)} results for {len(items)} items")
    return [finite_judge_result(r) for r in out]
