"""The rollout buffer of tree mode: images the refine stage starts from (docs/design.md#rollout-buffer).

Two bounded FIFO splits: *perfect* (score >= `perfect_score`, i.e. r = 1) and *imperfect*. A draw
picks the perfect split with probability `p_perfect` (default 0.15), else the imperfect one, then
an entry uniformly at random (with replacement: entries stay). When the chosen split is empty the
other one is used (documented, counted in `fallbacks`); drawing from an empty buffer raises.
The RNG is the buffer's own seeded `random.Random`, saved with it: `state_dict()` is JSON-able
(images as base64 PNG, lossless), so checkpoints never need pickle.
"""

from __future__ import annotations

import base64
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rollout.trajectory import image_from_png, png_bytes

__all__ = ["BufferEntry", "RolloutBuffer"]

log = logging.getLogger(__name__)


@dataclass
class BufferEntry:
    """One (prompt, image, r) of a generate (or refine) stage; `round_index` = rounds behind it;
    `fixes` = the judge's fixes of the image (`rollout.judge_fixes` JSON dicts; [] when it names none)."""

    prompt: str
    image: np.ndarray  # (H, W, 3) uint8
    score: float
    correct: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    round_index: int = 0
    fixes: list[dict[str, Any]] = field(default_factory=list)


class RolloutBuffer:
    """Bounded perfect/imperfect buffer sampled by the `p_perfect` rule with a seeded RNG."""

    def __init__(
        self, capacity: int = 256, *, p_perfect: float = 0.15, perfect_score: float = 1.0, seed: int = 0
    ) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        if not 0.0 <= p_perfect <= 1.0:
            raise ValueError(f"p_perfect must be in [0, 1], got {p_perfect}")
        if not 0.0 < perfect_score <= 1.0:
            raise ValueError(f"perfect_score must be in (0, 1], got {perfect_score}")
        self.capacity = capacity
        self.p_perfect = p_perfect
        self.perfect_score = perfect_score
        self._rng = random.Random(seed)
        self._perfect: deque[BufferEntry] = deque(maxlen=capacity)
        self._imperfect: deque[BufferEntry] = deque(maxlen=capacity)
        self.fallbacks = 0

    def __len__(self) -> int:
        return len(self._perfect) + len(self._imperfect)

    @property
    def num_perfect(self) -> int:
        return len(self._perfect)

    @property
    def num_imperfect(self) -> int:
        return len(self._imperfect)

    def is_perfect(self, score: float) -> bool:
        return score >= self.perfect_score

    def add(self, entry: BufferEntry) -> None:
        """Insert; the oldest entry of the same split is evicted when that split is full."""
        img = entry.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(
                f"buffer images must be (H, W, 3) uint8 arrays, got {getattr(img, 'shape', img)}"
            )
        if not 0.0 <= entry.score <= 1.0:
            raise ValueError(f"buffer entry score must be in [0, 1], got {entry.score}")
        (self._perfect if self.is_perfect(entry.score) else self._imperfect).append(entry)

    def extend(self, entries: list[BufferEntry]) -> None:
        for e in entries:
            self.add(e)

    def snapshot(self) -> RolloutBuffer:
        """An independent copy (entries shared, never mutated; lists and RNG copied): what a checkpoint
        of the moment before a step writes if that step is abandoned while it still changes this buffer."""
        import copy

        twin = copy.copy(self)
        twin._rng = copy.deepcopy(self._rng)
        twin._perfect, twin._imperfect = copy.copy(self._perfect), copy.copy(self._imperfect)
        return twin

    def sample(self, n: int) -> list[BufferEntry]:
        """Draw `n` start entries by the p_perfect rule (with replacement)."""
        if n < 1:
            raise ValueError(f"number of draws must be >= 1, got {n}")
        if not len(self):
            raise ValueError("cannot sample from an empty rollout buffer; run a generate stage first")
        out = []
        for _ in range(n):
            want_perfect = self._rng.random() < self.p_perfect
            split = self._perfect if want_perfect else self._imperfect
            if not split:
                self.fallbacks += 1
                log.debug(
                    "rollout buffer: %s split empty, drawing from the other",
                    "perfect" if want_perfect else "imperfect",
                )
                split = self._imperfect if want_perfect else self._perfect
            out.append(split[self._rng.randrange(len(split))])
        return out

    # --------------------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: settings, RNG state, entries (images as base64 PNG)."""
        version, internal, gauss = self._rng.getstate()
        return {
            "capacity": self.capacity,
            "p_perfect": self.p_perfect,
            "perfect_score": self.perfect_score,
            "fallbacks": self.fallbacks,
            "rng": [version, list(internal), gauss],
            "perfect": [_entry_to_json(e) for e in self._perfect],
            "imperfect": [_entry_to_json(e) for e in self._imperfect],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly (same entries, same future draws)."""
        self.capacity = int(state["capacity"])
        self.p_perfect = float(state["p_perfect"])
        self.perfect_score = float(state["perfect_score"])
        self.fallbacks = int(state["fallbacks"])
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._perfect = deque((_entry_from_json(e) for e in state["perfect"]), maxlen=self.capacity)
        self._imperfect = deque((_entry_from_json(e) for e in state["imperfect"]), maxlen=self.capacity)


def _entry_to_json(e: BufferEntry) -> dict[str, Any]:
    return {
        "prompt": e.prompt,
        "png": base64.b64encode(png_bytes(e.image)).decode("ascii"),
        "score": float(e.score),
        "correct": bool(e.correct),
        "metadata": e.metadata,
        "step": int(e.step),
        "round_index": int(e.round_index),
        "fixes": list(e.fixes),
    }


def _entry_from_json(d: dict[str, Any]) -> BufferEntry:
    return BufferEntry(
        prompt=d["prompt"],
        image=image_from_png(base64.b64decode(d["png"])),
        score=d["score"],
        correct=d["correct"],
        metadata=d["metadata"],
        step=d["step"],
        round_index=d["round_index"],
        fixes=list(d.get("fixes", [])),  # checkpoints written before fixes were kept have none
    )
