"""ShapesWorld tasks: a finite, seeded world of GenEval-format prompts about simple shapes.

Every prompt is a GenEval line `{"tag", "include": [{"class", "count", "color"?, "position"?:
[relation, index]}], "exclude"?, "prompt"}` (docs/design.md#geneval-format) over `SHAPES` ×
`COLORS` × counts 1–4 × relations, in the six GenEval tags plus three compositional ones in the spirit of
GenEval++ (`color_count`, `color_position`, `count_position`). The space is enumerated exactly,
so the train / test split is a fixed partition of it: prompts that say the same thing ("a circle
left of a square" and "a square right of a circle") are one group and land on the same side.

Semantics follow GenEval's evaluator: an include needs at least `count` objects of `class`, all
of `color` when given; `position: [rel, j]` says every such object stands `rel` to every object
of `include[j]` (by `relative_position`); an exclude forbids `count` or more of `class` (and of
`color`, an extension used by no tag here). Imports numpy only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from rollout.datasets import PromptRecord

__all__ = [
    "SHAPES",
    "PLURALS",
    "COLORS",
    "PALETTE",
    "RELATIONS",
    "GENEVAL_TAGS",
    "COMPOSITIONAL_TAGS",
    "TAGS",
    "POSITION_THRESHOLD",
    "Splits",
    "all_tasks",
    "build_splits",
    "sample_tasks",
    "metadata_for_prompt",
    "relative_position",
    "write_splits",
    "shapes_split",
]

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
PLURALS: dict[str, str] = {s: s + "es" if s.endswith("ss") else s + "s" for s in SHAPES}
# Saturated, well separated RGB values; the background is always a light grey tint.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (250, 140, 20),
    "yellow": (235, 225, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "purple": (135, 55, 175),
    "pink": (245, 115, 190),
    "black": (25, 25, 25),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
COMPOSITIONAL_TAGS: tuple[str, ...] = ("color_count", "color_position", "count_position")
TAGS: tuple[str, ...] = GENEVAL_TAGS + COMPOSITIONAL_TAGS
POSITION_THRESHOLD = 0.1  # GenEval's value
_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
_COUNTS = (2, 3, 4)  # counting tags; count 1 is the single-object tags


class Splits(NamedTuple):
    """Fixed partition of the task space; each entry is a GenEval-format dict."""

    train: list[dict[str, Any]]
    test: list[dict[str, Any]]


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations of box A to box B by GenEval's rule (boxes are (x0, y0, x1, y1), y down).

    The centre offset shrinks by `threshold` × (sum of the boxes' sizes) per axis; a relation
    holds when its axis carries more than half of the original offset's length.
    """
    ax0, ay0, ax1, ay1 = (float(v) for v in box_a)
    bx0, by0, bx1, by1 = (float(v) for v in box_b)
    dx = (ax0 + ax1 - bx0 - bx1) / 2
    dy = (ay0 + ay1 - by0 - by1) / 2
    rx = math.copysign(max(abs(dx) - threshold * (abs(ax1 - ax0) + abs(bx1 - bx0)), 0.0), dx)
    ry = math.copysign(max(abs(dy) - threshold * (abs(ay1 - ay0) + abs(by1 - by0)), 0.0), dy)
    if abs(rx) < 1e-3 and abs(ry) < 1e-3:
        return set()
    norm = math.hypot(dx, dy)
    rels = set()
    if rx / norm < -0.5:
        rels.add("left of")
    if rx / norm > 0.5:
        rels.add("right of")
    if ry / norm < -0.5:
        rels.add("above")
    if ry / norm > 0.5:
        rels.add("below")
    return rels


@lru_cache(maxsize=1)
def _task_space() -> tuple[tuple[str, str, str], ...]:
    """Every task as (tag, group key, json line), in a fixed order."""
    out: list[tuple[str, str, str]] = []
    for tag in TAGS:
        for group, meta in _enumerate_tag(tag):
            out.append((tag, group, json.dumps(meta)))
    return tuple(out)


def all_tasks(tags: Sequence[str] = TAGS) -> list[dict[str, Any]]:
    """The whole task space of `tags` (fresh dicts, fixed order)."""
    _check_tags(tags)
    return [json.loads(line) for tag, _, line in _task_space() if tag in tags]


def build_splits(seed: int = 0, test_fraction: float = 0.25, tags: Sequence[str] = TAGS) -> Splits:
    """Partition each tag's prompt groups: `ceil(test_fraction · groups)` go to test (≥ 1, and
    ≥ 1 group stays in train). Deterministic in `seed`; both sides keep the space's order."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r}; allowed: 0 < test_fraction < 1")
    _check_tags(tags)
    train, test = [], []
    for tag in tags:
        rows = [(g, line) for t, g, line in _task_space() if t == tag]
        groups = sorted({g for g, _ in rows})
        rng = np.random.default_rng([seed, TAGS.index(tag)])
        order = rng.permutation(len(groups))
        n_test = min(max(1, math.ceil(test_fraction * len(groups))), len(groups) - 1)
        test_groups = {groups[i] for i in order[:n_test]}
        for g, line in rows:
            (test if g in test_groups else train).append(json.loads(line))
    return Splits(train, test)


def sample_tasks(
    tasks: Sequence[dict[str, Any]], n: int, rng: np.random.Generator, balance_tags: bool = True
) -> list[dict[str, Any]]:
    """`n` tasks drawn with replacement; with `balance_tags` each draw first picks a tag uniformly
    (the big compositional tags would otherwise swamp single_object)."""
    if n < 0 or not tasks:
        raise ValueError(f"n={n}, len(tasks)={len(tasks)}; need n >= 0 and a non-empty task list")
    if not balance_tags:
        return [tasks[i] for i in rng.integers(0, len(tasks), size=n)]
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for t in tasks:
        by_tag.setdefault(t["tag"], []).append(t)
    names = sorted(by_tag)
    out = []
    for k in rng.integers(0, len(names), size=n):
        pool = by_tag[names[k]]
        out.append(pool[int(rng.integers(0, len(pool)))])
    return out


@lru_cache(maxsize=1)
def _prompt_index() -> dict[str, str]:
    return {json.loads(line)["prompt"]: line for _, _, line in _task_space()}


def metadata_for_prompt(prompt: str) -> dict[str, Any]:
    """The GenEval metadata of a ShapesWorld prompt (exact text, case and spaces normalised).

    Raises:
        ValueError: the prompt is not in the task space.
    """
    key = " ".join(prompt.strip().lower().split())
    line = _prompt_index().get(key)
    if line is None:
        raise ValueError(
            f"prompt {prompt!r} is not a ShapesWorld prompt (see examples.shapesworld.tasks.all_tasks)"
        )
    return json.loads(line)


def shapes_split(name: str, seed: int = 0, test_fraction: float = 0.25) -> list[PromptRecord]:
    """One side of the fixed split as `rollout.datasets.PromptRecord`s (category = tag), in a
    tag-balanced order.

    `seed` picks the partition: keep it fixed (0) across runs, or a model warm-started on one
    seed's train side may be evaluated on prompts it was trained on.
    """
    from rollout.datasets import PromptRecord

    splits = build_splits(seed, test_fraction)
    if name == "train":
        rows = splits.train
    elif name == "test":
        rows = splits.test
    else:
        raise ValueError(
            f"split {name!r}; allowed: 'train', 'test' (data.train / data.test 'shapes-<split>')"
        )
    # Round-robin over tags (each tag shuffled), so that any first-N prefix (data.limit,
    # data.eval_limit) is balanced across tags.
    rng = np.random.default_rng([seed, 7])
    by_tag = [[r for r in rows if r["tag"] == t] for t in TAGS]
    by_tag = [[rs[i] for i in rng.permutation(len(rs))] for rs in by_tag if rs]
    ordered = [rs[k] for k in range(max(map(len, by_tag))) for rs in by_tag if k < len(rs)]
    return [PromptRecord(r["prompt"], r, r["tag"], f"shapesworld:{name}:{i}") for i, r in enumerate(ordered)]


def write_splits(out_dir: str | Path, seed: int = 0, test_fraction: float = 0.25) -> tuple[Path, Path]:
    """Write `train.jsonl` and `test.jsonl` (GenEval format, readable by rollout.datasets)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = build_splits(seed, test_fraction)
    paths = (out / "train.jsonl", out / "test.jsonl")
    for path, rows in zip(paths, splits, strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


# --- enumeration -------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(*words: str) -> str:
    """'a red circle' / 'an orange circle'."""
    return f"{_article(words[0])} {' '.join(words)}"


def _noun(shape: str, count: int, color: str | None = None) -> str:
    words = ([color] if color else []) + [shape if count == 1 else PLURALS[shape]]
    return _a(*words) if count == 1 else f"{_NUMBERS[count]} {' '.join(words)}"


def _req(shape: str, count: int = 1, color: str | None = None, position: list | None = None) -> dict:
    r: dict[str, Any] = {"class": shape, "count": count}
    if color:
        r["color"] = color
    if position:
        r["position"] = position
    return r


def _pair_task(tag: str, a: tuple, rel: str, b: tuple) -> tuple[str, dict]:
    """'A rel B' with A = (shape, count, color|None), B likewise; group = the unordered relation."""
    (sa, na, ca), (sb, nb, cb) = a, b
    meta: dict[str, Any] = {
        "tag": tag,
        "include": [_req(sb, nb, cb), _req(sa, na, ca, [rel, 0])],
        "prompt": f"a photo of {_noun(sa, na, ca)} {rel} {_noun(sb, nb, cb)}",
    }
    exclude = [_req(s, n + 1) for s, n, _ in (b, a) if n > 1]
    if exclude:
        meta["exclude"] = exclude
    fwd, back = f"{a}|{rel}|{b}", f"{b}|{INVERSE_RELATION[rel]}|{a}"
    return min(fwd, back), meta


def _enumerate_tag(tag: str) -> list[tuple[str, dict]]:
    """(group key, metadata) for every prompt of `tag`."""
    out: list[tuple[str, dict]] = []
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    if tag == "single_object":
        for s in SHAPES:
            out.append((s, {"tag": tag, "include": [_req(s)], "prompt": f"a photo of {_a(s)}"}))
    elif tag == "two_object":
        for a, b in pairs:
            meta = {"tag": tag, "include": [_req(a), _req(b)], "prompt": f"a photo of {_a(a)} and {_a(b)}"}
            out.append(("|".join(sorted((a, b))), meta))
    elif tag in ("counting", "color_count"):
        colors = (None,) if tag == "counting" else COLORS
        for s in SHAPES:
            for c in colors:
                for n in _COUNTS:
                    meta = {
                        "tag": tag,
                        "include": [_req(s, n, c)],
                        "exclude": [_req(s, n + 1)],
                        "prompt": f"a photo of {_noun(s, n, c)}",
                    }
                    out.append((meta["prompt"], meta))
    elif tag == "colors":
        for s in SHAPES:
            for c in COLORS:
                out.append(
                    (f"{c} {s}", {"tag": tag, "include": [_req(s, 1, c)], "prompt": f"a photo of {_a(c, s)}"})
                )
    elif tag == "color_attr":
        for a, b in pairs:
            for ca in COLORS:
                for cb in COLORS:
                    if ca == cb:
                        continue
                    meta = {
                        "tag": tag,
                        "include": [_req(a, 1, ca), _req(b, 1, cb)],
                        "prompt": f"a photo of {_a(ca, a)} and {_a(cb, b)}",
                    }
                    out.append(("|".join(sorted((f"{ca} {a}", f"{cb} {b}"))), meta))
    elif tag == "position":
        for a, b in pairs:
            for rel in RELATIONS:
                out.append(_pair_task(tag, (a, 1, None), rel, (b, 1, None)))
    elif tag == "color_position":
        for a, b in pairs:
            for ca in COLORS:
                for cb in COLORS:
                    for rel in RELATIONS:
                        if ca != cb:
                            out.append(_pair_task(tag, (a, 1, ca), rel, (b, 1, cb)))
    elif tag == "count_position":
        for a, b in pairs:
            for n in (2, 3):
                for rel in RELATIONS:
                    out.append(_pair_task(tag, (a, n, None), rel, (b, 1, None)))
    else:
        raise ValueError(f"unknown tag {tag!r}; known: {list(TAGS)}")
    return out


def _check_tags(tags: Sequence[str]) -> None:
    bad = [t for t in tags if t not in TAGS]
    if bad or not tags:
        raise ValueError(f"tags={list(tags)!r}; allowed: a non-empty subset of {list(TAGS)}")


def _main() -> None:
    p = argparse.ArgumentParser(description="Write ShapesWorld train/test splits as GenEval JSONL.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.25)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    for path in write_splits(args.out, args.seed, args.test_fraction):
        logger.info("wrote %s", path)


if __name__ == "__main__":
    _main()
